# agl dashboard (issue 15): its extra, Playwright as the driver, and Debian's chromium for
# the browser test (Playwright never downloads a browser here: the test launches
# /usr/bin/chromium). Idempotent: apt and pip skip what is already installed.
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pip install --quiet -e '.[dashboard-test]'
export MPSTORE_TEST_CHROMIUM=/usr/bin/chromium
