#!/usr/bin/env bash
# Starts one funmatch command on every worker of a Cloud TPU VM pod.
#
#   tools/launch_tpu.sh TPU_NAME ZONE [options] -- funmatch-distill --config ... \
#       --workdir gs://BUCKET/run1
#
# Every worker runs the same command in the background (nohup), with its output
# in ~/funmatch_logs/NAME-HOSTNAME.log on that worker. The processes find each
# other through jax.distributed.initialize() without arguments (JAX reads the
# pod's worker list from the TPU metadata); FUNMATCH_DISTRIBUTED=auto makes
# funmatch call it. The --workdir must be one place every worker sees: a gs://
# URL (funmatch reads and writes buckets itself, with the VM's service account;
# no mount) or a shared filesystem (e.g. Filestore). See docs/cloud.md.
#
# Options:
#   --project P       Google Cloud project (default: gcloud's configured one)
#   --worker W        which workers (default: all); e.g. 0 to try one
#   --setup SPEC      before starting, `pip install SPEC` on every worker; SPEC is
#                     anything pip takes (a PyPI name, git+https://..., a URL),
#                     a gs://.../*.whl (copied with gcloud storage), or a local
#                     wheel or source checkout (copied with tpu-vm scp first).
#                     Repeat for several packages, e.g. --setup 'jax[tpu]' --setup .
#                     (a checkout is copied whole to ~/funmatch_setup/DIRNAME;
#                     a wheel from `pip wheel --no-deps . -w dist` is smaller)
#   --cwd DIR         directory the command runs in, relative to the worker's
#                     home (default: home), e.g. funmatch_setup/funmatch so that
#                     --config configs/... finds the copied checkout's recipes
#   --name NAME       run name in the log file names (default: funmatch-DATE-TIME)
#   --dry_run         print the gcloud commands instead of running them
#   -h, --help        this text
set -euo pipefail

PROG=$(basename "$0")

usage() {
  echo "usage: $PROG TPU_NAME ZONE [--project P] [--worker W] [--setup SPEC]..." \
       "[--cwd DIR] [--name NAME] [--dry_run] -- COMMAND [ARG...]" >&2
  echo "example: $PROG my-v4-64 us-central2-b --setup . --cwd funmatch_setup/funmatch" \
       "-- funmatch-distill --config configs/bit_i1k.py --workdir gs://my-bucket/run1" >&2
}

die() {
  echo "$PROG: error: $1" >&2
  usage
  exit 2
}

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

[[ $# -ge 2 ]] || die "TPU_NAME and ZONE are required"
TPU=$1
ZONE=$2
shift 2
[[ -n "$TPU" && "$TPU" != -* ]] || die "TPU_NAME is missing (got '$TPU')"
[[ -n "$ZONE" && "$ZONE" != -* ]] || die "ZONE is missing (got '$ZONE')"

PROJECT=""
WORKER="all"
NAME="funmatch-$(date +%Y%m%d-%H%M%S)"
DRY_RUN=0
CWD="."
SETUP=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) [[ $# -ge 2 ]] || die "--project needs a value"; PROJECT=$2; shift 2 ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --worker) [[ $# -ge 2 ]] || die "--worker needs a value"; WORKER=$2; shift 2 ;;
    --worker=*) WORKER=${1#*=}; shift ;;
    --setup) [[ $# -ge 2 ]] || die "--setup needs a value"; SETUP+=("$2"); shift 2 ;;
    --setup=*) SETUP+=("${1#*=}"); shift ;;
    --cwd) [[ $# -ge 2 ]] || die "--cwd needs a value"; CWD=$2; shift 2 ;;
    --cwd=*) CWD=${1#*=}; shift ;;
    --name) [[ $# -ge 2 ]] || die "--name needs a value"; NAME=$2; shift 2 ;;
    --name=*) NAME=${1#*=}; shift ;;
    --dry_run|--dry-run) DRY_RUN=1; shift ;;
    --mount|--mount=*) die "--mount is gone: give funmatch gs://BUCKET/... paths directly (docs/cloud.md)" ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command to run goes after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command to run: put it after --"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name '$NAME' may use only letters, digits, . _ -"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE" "--worker=$WORKER")
if [[ -n "$PROJECT" ]]; then WHERE+=("--project=$PROJECT"); fi

# One word for a shell: as is when plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs (or with --dry_run prints, ready to paste) one command.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    local line="" word
    for word in "$@"; do line+="${line:+ }$(quote "$word")"; done
    echo "$line"
  else
    "$@"
  fi
}

# Remote commands run from the worker's home directory; ~ expands there.
REMOTE_SETUP="cd ~ && export PATH=\"\$HOME/.local/bin:\$PATH\""
for spec in "${SETUP[@]+"${SETUP[@]}"}"; do
  if [[ -d "$spec" ]]; then  # a source checkout: copied whole to ~/funmatch_setup/NAME
    target="funmatch_setup/$(basename "$(cd "$spec" && pwd)")"
  elif [[ -f "$spec" ]]; then  # a wheel
    target="funmatch_setup/$(basename "$spec")"
  else
    target=""
  fi
  if [[ -n "$target" ]]; then
    run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" \
        --command "mkdir -p ~/funmatch_setup && rm -rf ~/$(printf '%q' "$target")"
    run "${GCLOUD[@]}" scp --recurse "$spec" "$TPU:~/$target" "${WHERE[@]}"
    REMOTE_SETUP+=" && python3 -m pip install -U ./$(printf '%q' "$target")"
  elif [[ "$spec" == gs://* ]]; then
    file="/tmp/$(basename "$spec")"
    REMOTE_SETUP+=" && gcloud storage cp $(printf '%q' "$spec") $(printf '%q' "$file")"
    REMOTE_SETUP+=" && python3 -m pip install -U $(printf '%q' "$file")"
  else
    REMOTE_SETUP+=" && python3 -m pip install -U $(printf '%q' "$spec")"
  fi
done
if [[ ${#SETUP[@]} -gt 0 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command "$REMOTE_SETUP"
fi

COMMAND=$(printf '%q ' "$@")
LOG="\$HOME/funmatch_logs/$NAME-\$(hostname).log"
REMOTE_START="mkdir -p ~/funmatch_logs && cd ~ && cd $(printf '%q' "$CWD")"
REMOTE_START+=" && export PATH=\"\$HOME/.local/bin:\$PATH\" FUNMATCH_DISTRIBUTED=auto"
REMOTE_START+=" && (nohup setsid ${COMMAND}> $LOG 2>&1 < /dev/null &)"
REMOTE_START+=" && echo \"started on \$(hostname), log: $LOG\""
run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command "$REMOTE_START"

if [[ $DRY_RUN -eq 0 ]]; then
  echo "follow worker 0 with:" \
       "gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker 0" \
       "--command 'tail -f ~/funmatch_logs/$NAME-*.log'"
fi
