#!/usr/bin/env bash
# deploy.sh: run the MCP control plane on this machine, or deploy it to Google Cloud.
# `./deploy.sh --help` explains; `./deploy.sh gcp --dry-run ...` prints the plan and runs nothing.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=${MCP_ROOT:-$SCRIPT_DIR}   # the project tree to act on (tests point it at a copy)

usage() {
  cat <<'EOF'
Usage: ./deploy.sh <command> [options]

Commands:
  local [options]   run the whole system on this machine (creates .venv on first use);
                    options are those of `python -m devstack.stack --help`
  test [pytest args]
                    install the project with its dev extras into .venv, lint (ruff) and run
                    the whole test suite (what CI runs)
  gcp [options]     deploy the five functions to Google Cloud Run functions (gen2) and the
                    Cloud Scheduler job that drives mcp_status_sweep
  help              this text

gcp options (flags win over the environment):
  --project ID           GCP project (env GCP_PROJECT, else GOOGLE_CLOUD_PROJECT)   [required]
  --region REGION        region of functions and scheduler (env GCP_REGION)  [us-central1]
  --env-file FILE        plain settings, KEY=VALUE lines (see shared/config.py / README); each
                         function gets only the settings it reads
  --secret ENV=SECRET[:VERSION]
                         take ENV from Secret Manager secret SECRET (version default `latest`);
                         repeatable; `ENV=` drops a default mapping. Defaults:
                           DATABASE_URL=mcp-database-url
                           SUPABASE_SERVICE_ROLE_KEY=mcp-supabase-service-role-key
                           SUPABASE_JWT_SECRET=mcp-supabase-jwt-secret
                           DTMA_KEY_SECRET=mcp-dtma-key-secret
                         Secrets passed as environment variables are resolved when an instance
                         starts: after rotating a secret, re-run this command (new revision).
  --no-default-secrets   start from no secret mapping at all
  --only FUNCTION        deploy one function (entry point or kebab name); the scheduler job is
                         (re)configured only with mcp_status_sweep
  --min-instances N      [0]      --max-instances N   [20]     --concurrency N  [40]
  --cpu N                [1]      --memory SIZE       [256Mi]  --timeout SECS   [60s]
  --runtime-sa EMAIL     runtime service account  [mcp-functions@PROJECT.iam.gserviceaccount.com]
  --scheduler-sa EMAIL   identity of the scheduler's OIDC token
                                              [mcp-sweep-invoker@PROJECT.iam.gserviceaccount.com]
  --schedule CRON        sweep schedule                                          ['* * * * *']
  --skip-enable-apis     do not run `gcloud services enable` (the APIs are already on)
  --root DIR             project tree to deploy (env MCP_ROOT)                  [this checkout]
  --dry-run              print every command (`+ ` lines, shell-quoted) and run none

Missing or invalid configuration (no project, a setting a function cannot start without) is
refused with exit status 2 and a list, before anything is run. Re-running updates in place.
Environment: PYTHON picks the interpreter that packages the functions (default .venv/bin/python
if present, else python3); it needs the runtime dependencies installed, as requirements.txt pins
them to the installed versions.
EOF
}

die() { printf 'deploy.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'deploy.sh: %s (see ./deploy.sh --help)\n' "$*" >&2; exit 2; }

# Create .venv with the project and the given extra (`local` or `dev`); reinstall when
# pyproject.toml changed since that extra was last installed.
ensure_venv() {
  local extra=${1:-local}
  local venv="$ROOT/.venv" stamp="$ROOT/.venv/.installed-$extra"
  if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
  fi
  if [[ ! -e $stamp || $ROOT/pyproject.toml -nt $stamp ]]; then
    (cd "$ROOT" && "$venv/bin/pip" install -q --disable-pip-version-check -e ".[$extra]")
    touch "$stamp"
  fi
  PYTHON=$venv/bin/python
}

cmd_test() {
  ensure_venv dev
  cd "$ROOT"
  "$PYTHON" -m ruff check .
  exec "$PYTHON" -m pytest "$@"
}

cmd_local() {
  ensure_venv
  exec "$PYTHON" -m devstack.stack "$@"
}

# --- printing and running commands (gcp) ---------------------------------------------------------
DRY_RUN=0
SAFE_WORD='^[A-Za-z0-9_@%+=:,./-]+$'
OPTION_PREFIX='^--[a-z0-9-]+='   # --flag='value': quote the value only
PLACEHOLDER_WORD='^[A-Za-z0-9_@%+=:,./-]*[$][{][A-Z0-9_]+[}][A-Za-z0-9_@%+=:,./-]*$'

# Print the arguments as one line a shell reads back as the same words. A dry run's `${NAME_URL}`
# placeholders are double-quoted so that pasting the plan expands them.
shell_quote() {
  local out=() arg prefix sq="'\\''"
  for arg in "$@"; do
    prefix=""
    if [[ $arg =~ $OPTION_PREFIX ]]; then prefix=${BASH_REMATCH[0]}; arg=${arg#"$prefix"}; fi
    if [[ $arg =~ $SAFE_WORD ]]; then out+=("$prefix$arg")
    elif ((DRY_RUN)) && [[ $arg =~ $PLACEHOLDER_WORD ]]; then out+=("$prefix\"$arg\"")
    else out+=("$prefix'${arg//\'/$sq}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Show a command: on the plan (fd 3, stdout) in a dry run, as a trace on stderr otherwise.
show() {
  if ((DRY_RUN)); then printf '+ %s\n' "$(shell_quote "$@")" >&3
  else printf '+ %s\n' "$(shell_quote "$@")" >&2
  fi
}
note() { if ((DRY_RUN)); then printf '# %s\n' "$*" >&3; fi; }

# Run a command (its output goes to stderr, so stdout carries only the summary); a dry run shows it.
run() {
  show "$@"
  ((DRY_RUN)) && return 0
  "$@" >&2
}

# IAM changes can fail for a while after a service account is created (eventual consistency).
run_retrying() {
  local attempt
  for attempt in 1 2 3 4 5; do
    if run "$@"; then return 0; fi
    ((attempt < 5)) || break
    printf 'deploy.sh: retrying in %ss\n' "$((attempt * 3))" >&2
    sleep "$((attempt * 3))"
  done
  die "giving up after 5 attempts: $(shell_quote "$@")"
}

# Does the resource a read-only command describes exist? A dry run shows the command and answers
# no, so the plan shows the commands that create what may be missing.
exists() {
  show "$@"
  ((DRY_RUN)) && return 1
  "$@" >/dev/null 2>&1
}

# --- gcp --------------------------------------------------------------------------------------------
readonly SWEEP=mcp_status_sweep SWEEP_FUNCTION=mcp-status-sweep SWEEP_JOB=mcp-status-sweep
readonly APIS=(cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com cloudscheduler.googleapis.com secretmanager.googleapis.com
  iam.googleapis.com)

cmd_gcp() {
  local project=${GCP_PROJECT:-${GOOGLE_CLOUD_PROJECT:-}} region=${GCP_REGION:-us-central1}
  local min_instances=0 max_instances=20 concurrency=40 cpu=1 timeout=60s
  # 256Mi: docs/benchmarks.md measures each function's peak RSS (target < 160 MiB) under load;
  # keep the headroom when changing this figure.
  local memory=256Mi
  local runtime_sa="" scheduler_sa="" schedule='* * * * *' env_file="" skip_apis=0
  local -a plan_args=() problems=()

  while (($#)); do
    local opt=$1 val=""
    case $opt in
      --dry-run | --no-default-secrets | --skip-enable-apis | -h | --help) shift ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) (($# >= 2)) || usage_error "$opt needs a value"; val=$2; shift 2 ;;
      *) usage_error "gcp: unexpected argument '$opt'" ;;
    esac
    case $opt in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --no-default-secrets) plan_args+=(--no-default-secrets) ;;
      --skip-enable-apis) skip_apis=1 ;;
      --project) project=$val ;;
      --region) region=$val ;;
      --min-instances) min_instances=$val ;;
      --max-instances) max_instances=$val ;;
      --concurrency) concurrency=$val ;;
      --memory) memory=$val ;;
      --cpu) cpu=$val ;;
      --timeout) timeout=$val ;;
      --runtime-sa) runtime_sa=$val ;;
      --scheduler-sa) scheduler_sa=$val ;;
      --schedule) schedule=$val ;;
      --env-file) env_file=$val ;;
      --secret) plan_args+=(--secret "$val") ;;
      --only) plan_args+=(--function "$val") ;;
      --root) ROOT=$val ;;
      *) usage_error "gcp: unknown option $opt" ;;
    esac
  done

  # --- check everything before running anything ---
  [[ -d $ROOT ]] || usage_error "--root $ROOT is not a directory"
  ROOT=$(cd -- "$ROOT" && pwd)
  if [[ -n $env_file ]]; then
    if [[ -f $env_file ]]; then env_file=$(cd -- "$(dirname -- "$env_file")" && pwd)/$(basename -- "$env_file")
    else problems+=("--env-file $env_file: no such file")
    fi
  fi
  if [[ -z $project ]]; then
    problems+=("project: not set (--project, or GCP_PROJECT / GOOGLE_CLOUD_PROJECT)")
  elif ! [[ $project =~ ^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]]; then
    problems+=("project: '$project' is not a project id")
  fi
  [[ $region =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || problems+=("region: '$region' is not a region")
  [[ $min_instances =~ ^[0-9]+$ ]] || problems+=("--min-instances: '$min_instances' is not a number")
  [[ $max_instances =~ ^[1-9][0-9]*$ ]] || problems+=("--max-instances: '$max_instances' is not a number >= 1")
  if [[ $min_instances =~ ^[0-9]+$ && $max_instances =~ ^[0-9]+$ ]] && ((min_instances > max_instances)); then
    problems+=("--min-instances $min_instances exceeds --max-instances $max_instances")
  fi
  if ! [[ $concurrency =~ ^[1-9][0-9]*$ ]] || ((concurrency > 1000)); then
    problems+=("--concurrency: '$concurrency' is not in 1..1000")
  fi
  [[ $cpu =~ ^[0-9]+(\.[0-9]+)?$ ]] || problems+=("--cpu: '$cpu' is not a number of vCPUs")
  [[ $memory =~ ^[1-9][0-9]*(Mi|Gi)$ ]] || problems+=("--memory: '$memory' is not like 256Mi or 1Gi")
  if [[ $timeout =~ ^[1-9][0-9]*s?$ ]]; then timeout=${timeout%s}s
  else problems+=("--timeout: '$timeout' is not a number of seconds")
  fi
  [[ -n ${schedule// /} ]] || problems+=("--schedule: empty")
  runtime_sa=${runtime_sa:-mcp-functions@$project.iam.gserviceaccount.com}
  scheduler_sa=${scheduler_sa:-mcp-sweep-invoker@$project.iam.gserviceaccount.com}
  [[ $runtime_sa == ?*@?* ]] || problems+=("--runtime-sa: '$runtime_sa' is not a service account email")
  [[ $scheduler_sa == ?*@?* ]] || problems+=("--scheduler-sa: '$scheduler_sa' is not a service account email")

  PYTHON=${PYTHON:-}
  if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  command -v "$PYTHON" >/dev/null || die "no Python: $PYTHON not found (set PYTHON=...)"
  local -a package
  if [[ $ROOT == "$SCRIPT_DIR" ]]; then package=("$PYTHON" -m ops.gcp_package)
  else package=("$PYTHON" "$SCRIPT_DIR/ops/gcp_package.py" --root "$ROOT")
  fi
  [[ -n $env_file && -f $env_file ]] && plan_args+=(--env-file "$env_file")

  # The per-function plan: which settings and secrets each function gets, and whether each one
  # would start (shared/config.py's own check). One record a line, fields separated by US.
  local records rc=0
  records=$(cd "$ROOT" && "${package[@]}" --plan --format=shell --project "$project" "${plan_args[@]}") || rc=$?
  local -a entries=() names=() access=() envs=() secret_refs=() secrets=()
  local kind a b c d e
  while IFS=$'\x1f' read -r kind a b c d e; do
    case $kind in
      problem) problems+=("$a") ;;
      warning) printf 'deploy.sh: warning: %s\n' "$a" >&2 ;;
      function) entries+=("$a"); names+=("$b"); access+=("$c"); envs+=("$d"); secret_refs+=("$e") ;;
      secret) secrets+=("$a") ;;
    esac
  done <<<"$records"
  if ((rc != 0)) && ! grep -q '^problem' <<<"$records"; then
    printf 'deploy.sh gcp: could not compute the deploy plan with %s (exit %s, see above)\n' "$PYTHON" "$rc" >&2
    exit 2
  fi
  if ((${#problems[@]})); then
    {
      printf 'deploy.sh gcp: refusing to deploy; missing or invalid configuration:\n'
      printf '  - %s\n' "${problems[@]}"
      printf 'Plain settings go in --env-file FILE (KEY=VALUE lines); secrets are mapped with\n'
      printf -- '--secret ENV=SECRET_NAME[:VERSION] (defaults: see ./deploy.sh --help).\n'
    } >&2
    exit 2
  fi
  ((${#entries[@]})) || die "nothing to deploy"

  # --- the deploy -----------------------------------------------------------------------------
  exec 3>&1
  cd "$ROOT"
  note "deploy.sh gcp --dry-run: nothing below was run. Commands run from $ROOT."
  local -a g=(--project="$project" --quiet)

  # Package first: a function that cannot be built stops the deploy before the cloud is touched.
  local -a only_args=()
  local entry
  for entry in "${entries[@]}"; do only_args+=(--function "$entry"); done
  run "${package[@]}" --out build/gcp "${only_args[@]}"

  ((skip_apis)) || run gcloud services enable "${APIS[@]}" "${g[@]}"

  local secret missing=()
  for secret in "${secrets[@]}"; do
    exists gcloud secrets describe "$secret" --format='value(name)' "${g[@]}" || ((DRY_RUN)) || missing+=("$secret")
  done
  if ((${#missing[@]})); then
    printf 'deploy.sh gcp: these secrets do not exist in project %s (or these credentials cannot see them):\n' \
      "$project" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'Create each (printf %%s VALUE | gcloud secrets create NAME --data-file=-), or drop its mapping (--secret ENV=).\n' >&2
    exit 2
  fi

  ensure_service_account "$runtime_sa" "MCP control plane functions (runtime)"
  # Before the deploys: a revision whose service account cannot read its secrets does not start.
  for secret in "${secrets[@]}"; do
    run_retrying gcloud secrets add-iam-policy-binding "$secret" --member="serviceAccount:$runtime_sa" \
      --role=roles/secretmanager.secretAccessor --condition=None "${g[@]}"
  done

  local i
  local -a deploy
  for i in "${!entries[@]}"; do
    deploy=(gcloud functions deploy "${names[i]}" --gen2 --region="$region" --project="$project"
      --runtime=python312 --source="build/gcp/${entries[i]}" --entry-point="${entries[i]}" --trigger-http
      --service-account="$runtime_sa")
    # User-facing functions verify the Supabase JWT in code and the heartbeat its toolbox token:
    # browsers cannot mint Google ID tokens and CORS preflights carry no credentials, so Cloud Run
    # IAM must let them through. Only the scheduler-driven sweep is IAM-private.
    if [[ ${access[i]} == public ]]; then deploy+=(--allow-unauthenticated)
    else deploy+=(--no-allow-unauthenticated)
    fi
    deploy+=(--set-env-vars="${envs[i]}")
    if [[ -n ${secret_refs[i]} ]]; then deploy+=(--set-secrets="${secret_refs[i]}")
    else deploy+=(--clear-secrets)
    fi
    deploy+=(--min-instances="$min_instances" --max-instances="$max_instances" --concurrency="$concurrency"
      --cpu="$cpu" --memory="$memory" --timeout="$timeout" --quiet)
    run "${deploy[@]}"
  done

  local -A urls=()
  for i in "${!entries[@]}"; do
    urls[${entries[i]}]=$(function_url "${names[i]}" "$region" "$project")
  done

  if [[ -v "urls[$SWEEP]" ]]; then
    local sweep_url=${urls[$SWEEP]}
    ensure_service_account "$scheduler_sa" "MCP status sweep invoker (Cloud Scheduler OIDC)"
    # Cloud Run Invoker on the sweep only: the job's OIDC token opens nothing else.
    run_retrying gcloud functions add-invoker-policy-binding "$SWEEP_FUNCTION" --region="$region" \
      --member="serviceAccount:$scheduler_sa" "${g[@]}"
    local -a job=(--location="$region" --schedule="$schedule" --http-method=POST --uri="$sweep_url"
      --oidc-service-account-email="$scheduler_sa" --oidc-token-audience="$sweep_url"
      --message-body='{}' --attempt-deadline=60s "${g[@]}")
    if exists gcloud scheduler jobs describe "$SWEEP_JOB" --location="$region" "${g[@]}"; then
      run gcloud scheduler jobs update http "$SWEEP_JOB" "${job[@]}" --update-headers=Content-Type=application/json
    else
      note "if the job already exists, the same flags go to: gcloud scheduler jobs update http $SWEEP_JOB" \
        "... --update-headers=Content-Type=application/json"
      run gcloud scheduler jobs create http "$SWEEP_JOB" "${job[@]}" --headers=Content-Type=application/json
    fi
  fi

  summary "$project" "$region" "$schedule"
}

# Make sure a service account exists; create it when it belongs to the project.
ensure_service_account() {
  local email=$1 title=$2
  exists gcloud iam service-accounts describe "$email" "${g[@]}" && return 0
  if [[ $email != *"@$project.iam.gserviceaccount.com" ]]; then
    ((DRY_RUN)) && { note "$email must exist already (outside project $project, it is not created)"; return 0; }
    die "service account $email does not exist (outside project $project, it is not created)"
  fi
  note "only if the describe above fails:"
  run gcloud iam service-accounts create "${email%%@*}" --display-name="$title" "${g[@]}"
}

# The URL of a deployed function. A dry run prints the command that reads it and answers with a
# `${NAME_URL}` placeholder.
function_url() {
  local name=$1 region=$2 project=$3 var url
  local -a cmd=(gcloud functions describe "$name" --gen2 --region="$region" --project="$project"
    --format='value(serviceConfig.uri)')
  if ((DRY_RUN)); then
    var=$(tr 'a-z-' 'A-Z_' <<<"$name")_URL
    printf '+ %s=%s\n' "$var" "\$($(shell_quote "${cmd[@]}"))" >&3
    printf '%s' "\${$var}"
    return 0
  fi
  show "${cmd[@]}"
  url=$("${cmd[@]}")
  [[ $url == https://* ]] || die "could not read the URL of $name (got '$url')"
  printf '%s' "$url"
}

summary() {
  local project=$1 region=$2 schedule=$3 prefix="" i
  ((DRY_RUN)) && prefix="# "
  {
    printf '%sDeployed to project %s, region %s:\n' "$prefix" "$project" "$region"
    for i in "${!entries[@]}"; do
      printf '%s  %-24s %s\n' "$prefix" "${names[i]}" "${urls[${entries[i]}]}"
    done
    if [[ -v "urls[$SWEEP]" ]]; then
      printf '%sCloud Scheduler job %s calls the sweep on %s (OIDC as %s).\n' \
        "$prefix" "$SWEEP_JOB" "'$schedule'" "$scheduler_sa"
    fi
    if [[ -v "urls[dtma_heartbeat_ingest]" ]]; then
      printf '%sOn every toolbox, put this line in /etc/dtma.conf, then restart dtma.service:\n' "$prefix"
      printf '%sAGENTOPIA_API_BASE_URL=%s\n' "$prefix" "${urls[dtma_heartbeat_ingest]}"
    fi
  } >&3
}

main() {
  (($#)) || { usage >&2; exit 2; }
  local command=$1
  shift
  case $command in
    local) cmd_local "$@" ;;
    test) cmd_test "$@" ;;
    gcp) cmd_gcp "$@" ;;
    -h | --help | help) usage ;;
    *) usage_error "unknown command '$command'" ;;
  esac
}

main "$@"
