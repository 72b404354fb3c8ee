# Sourced by the benchmark scripts that train into runs/ and write into OUT: they only ever touch run dirs
# and an OUT they make themselves, and refuse to start otherwise.
#   fresh_runs "why" runs/a runs/b ...   # each must not exist
#   fresh_out OUT                         # must not exist, or be an empty directory; then made
fresh_runs() {
  local why=$1 run
  shift
  for run in "$@"; do
    if [ -e "$run" ]; then
      echo "error: $run exists (an earlier run). Fix: move it away; $why" >&2
      exit 2
    fi
  done
}

fresh_out() {
  if [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null || echo file)" ]; then
    echo "error: $1 is not an empty directory. Fix: choose a new OUT" >&2
    exit 2
  fi
  mkdir -p "$1"
}
