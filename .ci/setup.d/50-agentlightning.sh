# agent-lightning adapter (mpstore.agentlightning): the otel extra in the test venv, and one
# extra virtual environment per supported agent-lightning release, each with mpstore
# installed -e and its test deps. tests/test_agentlightning.py runs the adapter's tests
# (tests/agentlightning/) inside each, found through the variables exported here.
# Idempotent: an existing venv is reused and pip installs nothing new.
python -m pip install --quiet -e '.[test,otel]'
for _agl_version in 0.3.0 0.2.2; do
  _agl_venv="$PWD/.venv-agl-$_agl_version"
  [ -x "$_agl_venv/bin/python" ] || python3 -m venv "$_agl_venv"
  "$_agl_venv/bin/python" -m pip install --quiet --upgrade pip
  "$_agl_venv/bin/python" -m pip install --quiet -e '.[test,agentlightning]' \
    "agentlightning==$_agl_version"
  # Both packages install an `agl` script; the last one installed wins. mpstore's serves its
  # own commands and hands the others to agent-lightning's (tests/agentlightning/test_cli.py).
  grep -q mpstore "$_agl_venv/bin/agl" ||
    "$_agl_venv/bin/python" -m pip install --quiet --no-deps --force-reinstall -e .
done
export MPSTORE_AGL_030_PYTHON="$PWD/.venv-agl-0.3.0/bin/python"
export MPSTORE_AGL_022_PYTHON="$PWD/.venv-agl-0.2.2/bin/python"
unset _agl_version _agl_venv
