#!/bin/sh
# Entry point of the pipeline's image: the `inspection` CLI, with a default worker id per container.
#
# `inspection worker KIND` names its slot `KIND-<pid>` unless --worker-id is given, and an inference slot's
# transactional id is `inspection-infer-<worker id>`. Every container numbers its processes from 1, and the
# replicas of a scaled service (`docker compose up --scale inference=3`) share one command line, so they
# would share that id and fence each other's transactions. The container's hostname (its id, unless set)
# tells them apart and stays the same when the container restarts.
set -eu
if [ "${1:-}" = worker ] && [ -n "${2:-}" ]; then
  case " $* " in
    *" --worker-id "* | *" --worker-id="*) ;;
    *) set -- "$@" --worker-id "$2-$(hostname)" ;;
  esac
fi
exec inspection "$@"
