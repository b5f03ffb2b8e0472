# Installs the Debian packages of the commands a benchmark needs, when missing (sourced by
# the bench scripts; each command's package has its name).
#
#   install_missing wrk nginx
install_missing() {
  local need=() cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
  fi
}
