#!/bin/bash
# demo-lib.sh - what demo/standalone.sh and demo/cluster.sh share. Source it after
# tests/infra/common.sh (it uses log and warn); it only defines functions and PROBLEMS.

# indent: both demos show the tools' output indented under a step's banner
indent() { sed 's/^/    /'; }

# problem MSG: a failed check does not stop a demo: warn now, list it at the end (problems_exit)
PROBLEMS=()
problem() { warn "$*"; PROBLEMS+=("$*"); }

# ok VALUE EXPECTED: the result column of both summary tables
ok() { if [ "$1" = "$2" ]; then echo ok; else echo FAIL; fi; }

# problems_exit: both demos end alike: list the PROBLEMS noted on the way and exit 1, or exit 0
problems_exit() {
  if [ "${#PROBLEMS[@]}" -gt 0 ]; then
    echo
    log "${#PROBLEMS[@]} problem(s):"
    printf '    - %s\n' "${PROBLEMS[@]}"
    exit 1
  fi
  exit 0
}
