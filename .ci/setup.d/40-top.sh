# agl top (issue 14): tests/test_top.py runs the live view in a real terminal, tmux.
# prometheus_client and rich come with the test extra (pyproject.toml).
if ! command -v tmux >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
fi
