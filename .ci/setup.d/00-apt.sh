# Debian packages the tests use, installed once (sourced by .ci/run). Other steps may call
# apt_install for their own packages: the package lists are fetched at most once per run.
_apt_updated=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "not root: skipping apt-get install $*" >&2
    return 0
  fi
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$_apt_updated" ]; then
    apt-get update -qq >/dev/null
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# libfaketime: tests/test_clock_step.py steps a real server's wall clock with it.
apt_install faketime
