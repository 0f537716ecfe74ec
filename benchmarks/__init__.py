"""The mpstore benchmark harness (SPEC section 8, issue 4).

Entry point: ``python -m benchmarks.run`` (``--help`` lists the options; ``--quick`` for a
short pass, ``--only cycle --k 4`` for one scenario). See ``benchmarks/README.md``.

Modules:

* :mod:`benchmarks.common`   free ports, key files, percentiles, medians, bounded waits;
* :mod:`benchmarks.servers`  the servers under test as subprocesses (``agl store``, echo
  servers, agent-lightning's ``agl store``), their RSS and thread counts;
* :mod:`benchmarks.limits`   the two physical limits: a raw ``multiprocessing.connection``
  echo and a ``BaseManager`` echo (servers and client loops);
* :mod:`benchmarks.workload` the store workloads run inside client processes;
* :mod:`benchmarks.pool`     a pool of client processes started once and driven by messages;
* :mod:`benchmarks.scenarios` / :mod:`benchmarks.extra` the scenarios;
* :mod:`benchmarks.report`   ratios, issue-4 targets, the printed table;
* :mod:`benchmarks.agl_workload` the same cycle against agent-lightning 0.2.2 (runs in
  that project's own virtual environment, imports only ``agentlightning`` and the stdlib).
"""
