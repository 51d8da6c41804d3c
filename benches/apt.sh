# Sourced by the bench scripts: installs the peers and tools they need.

# apt_install PACKAGE...: installs the packages from Debian (through sudo
# unless root); does nothing when given none.
apt_install() {
  [ $# -gt 0 ] || return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
