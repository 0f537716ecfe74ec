# The PostgreSQL backend's tests: its extra (psycopg 3 + pool) and PostgreSQL's server binaries.
# The tests start a throwaway cluster themselves (tests/pg.py), as the `postgres` user when
# run as root; MPSTORE_TEST_POSTGRES_URL, if exported before .ci/run, points them at an
# existing server instead. Idempotent and quiet.
python -m pip install --quiet -e '.[test,postgres]'
if [ -z "${MPSTORE_TEST_POSTGRES_URL:-}" ] && ! command -v pg_ctl >/dev/null \
    && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq postgresql >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; } \
      || echo "30-postgres.sh: could not install PostgreSQL; its tests will skip" >&2
  else
    echo "30-postgres.sh: no PostgreSQL binaries (initdb, pg_ctl); its tests will skip" >&2
  fi
fi
