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
                    install the project with its dev extras into .venv, lint (ruff), check the
                    layers of shared/ (import-linter) and run the whole test suite (what CI runs)
  gcp [options]     deploy the functions (ALL_FUNCTIONS of shared/core/config.py) to Google Cloud Run
                    functions (gen2), the Cloud Scheduler job that drives mcp_status_sweep,
                    the Cloud Tasks queue that carries agent commands to dtma_command_worker and
                    the Cloud Logging log-based metrics of agent calls and command outcomes
  help              this text

gcp options (flags win over the environment):
  --project ID           GCP project (env GCP_PROJECT, else GOOGLE_CLOUD_PROJECT)   [required]
  --region REGION        region of functions and scheduler (env GCP_REGION)  [us-central1]
  --env-file FILE        plain settings, KEY=VALUE lines (see docs/configuration.md); each
                         function gets only the settings it reads
  --secret ENV=SECRET[:VERSION]
                         take ENV from Secret Manager secret SECRET (version default `latest`);
                         repeatable; `ENV=` drops a default mapping. Defaults:
                           DATABASE_URL=mcp-database-url
                           SUPABASE_SERVICE_ROLE_KEY=mcp-supabase-service-role-key
                           SUPABASE_JWT_SECRET=mcp-supabase-jwt-secret
                           DTMA_KEY_SECRET=mcp-dtma-key-secret
                           IDEMPOTENCY_SECRET=mcp-idempotency-secret
                         Secrets passed as environment variables are resolved when an instance
                         starts: after rotating a secret, re-run this command (new revision).
  --no-default-secrets   start from no secret mapping at all
  --only FUNCTION        deploy one function (entry point or kebab name); the scheduler job is
                         (re)configured only with mcp_status_sweep, the command queue only with
                         dtma_command_worker or a function that enqueues commands (deploy, manage,
                         sweep: they are given the URL of the worker deployed before)
  --min-instances N      [0]      --max-instances N   [20]     --concurrency N  [40]
  --cpu N                [1]      --memory SIZE       [256Mi]  --timeout SECS   [60s]
  --status-concurrency N requests one mcp_status instance takes at once, each a gunicorn thread
                         (THREADS): watchers hold theirs up to WATCH_MAX_SECONDS (docs/watch.md) [250]
  --worker-timeout SECS  timeout of dtma_command_worker (the others get --timeout); at least
                         COMMAND_DISPATCH_DEADLINE_SECONDS, at most 3600          [1800s]
  --runtime-sa EMAIL     runtime service account  [mcp-functions@PROJECT.iam.gserviceaccount.com]
  --scheduler-sa EMAIL   identity of the scheduler's OIDC token
                                              [mcp-sweep-invoker@PROJECT.iam.gserviceaccount.com]
  --schedule CRON        sweep schedule                                          ['* * * * *']
  --queue NAME           Cloud Tasks queue of agent commands, in --region     [mcp-dtma-commands]
  --tasks-sa EMAIL       identity of the OIDC token Cloud Tasks sends the worker
                                              [mcp-tasks-invoker@PROJECT.iam.gserviceaccount.com]
  --skip-enable-apis     do not run `gcloud services enable` (the APIs are already on)
  --no-log-metrics       do not create or update the log-based metrics (mcp_dtma_call_latency,
                         mcp_dtma_call_errors, mcp_command_outcomes, mcp_deploy_time_to_running;
                         docs/deploying.md "Metrics and logs"); their LogMetric files go to
                         build/gcp/log-metrics/, and a dry run prints each one
  --root DIR             project tree to deploy (env MCP_ROOT)                  [this checkout]
  --dry-run              print every command (`+ ` lines, shell-quoted) and run none

The functions that enqueue commands get COMMAND_QUEUE, COMMAND_WORKER_URL, COMMAND_INVOKER_SA and
TASKS_MODE=cloud_tasks from these options (so --env-file may not set them). The sweep and the worker
get SWEEP_INVOKER_SA / WORKER_INVOKER_SA (--scheduler-sa, --tasks-sa) and SWEEP_INVOKER_AUDIENCE /
WORKER_INVOKER_AUDIENCE (their own URL): besides IAM, each checks its caller's OIDC token against them.
A sweep or worker not deployed before is deployed twice on its first run: once to learn its URL
(refusing every caller meanwhile), then with that URL as its audience.
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

# tests/test_web_console.py drives Debian's chromium (never a browser Playwright downloads) against the
# console in web/, whose supabase-js comes from npm (web/package-lock.json). As root (CI: a fresh machine
# with only Python) both are installed when missing, and failing to is an error; otherwise a missing one is
# named here and the test skips saying why.
APT_PACKAGES_INSTALLED=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if ((APT_PACKAGES_INSTALLED == 0)); then apt-get update -qq >&2 || return 1; APT_PACKAGES_INSTALLED=1; fi
  apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_web_test_tools() {
  local root=0
  [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && root=1
  if [[ ! -x /usr/bin/chromium ]]; then
    if ((root)); then
      echo "installing Debian's chromium for tests/test_web_console.py" >&2
      apt_install chromium || { echo "apt-get install chromium failed" >&2; return 1; }
    else
      echo "note: /usr/bin/chromium is missing, so tests/test_web_console.py will skip (sudo apt-get install -y chromium)" >&2
    fi
  fi
  [[ -f $ROOT/web/node_modules/@supabase/supabase-js/dist/umd/supabase.js && -f $ROOT/web/node_modules/axe-core/axe.min.js ]] \
    && return 0
  if ! command -v npm >/dev/null && ((root)); then
    echo "installing Debian's npm for web/'s locked packages" >&2
    apt_install npm || { echo "apt-get install npm failed" >&2; return 1; }
  fi
  if command -v npm >/dev/null; then
    (cd "$ROOT/web" && npm ci --no-audit --no-fund --loglevel=error >&2) \
      || { echo "npm ci in web/ failed (is the npm registry reachable?)" >&2; ((root == 0)) || return 1; }
  else
    echo "note: npm is missing, so web/node_modules cannot be installed and tests/test_web_console.py will skip" >&2
  fi
}

cmd_test() {
  ensure_venv dev
  ensure_web_test_tools
  cd "$ROOT"
  "$PYTHON" -m ruff check .
  "$ROOT/.venv/bin/lint-imports"
  exec "$PYTHON" -m pytest "$@"
}

cmd_local() {
  ensure_venv
  # The web console at / loads supabase-js from web/node_modules (docs/web-console.md).
  if [[ ! -f $ROOT/web/node_modules/@supabase/supabase-js/dist/umd/supabase.js ]] && command -v npm >/dev/null; then
    (cd "$ROOT/web" && npm ci --no-audit --no-fund --loglevel=error >&2) || echo "npm ci in web/ failed: the console at / cannot load supabase-js" >&2
  fi
  exec "$PYTHON" -m devstack.stack "$@"
}

# --- printing and running commands (gcp) ---------------------------------------------------------
DRY_RUN=0
SAFE_WORD='^[A-Za-z0-9_@%+=:,./-]+$'
OPTION_PREFIX='^--[a-z0-9-]+='   # --flag='value': quote the value only
PLACEHOLDER='[$][{][A-Z0-9_]+[}]'

# Print the arguments as one line a shell reads back as the same words. A dry run's `${NAME_URL}`
# placeholders are double-quoted so that pasting the plan expands them.
shell_quote() {
  local out=() arg prefix sq="'\\''"
  for arg in "$@"; do
    prefix=""
    if [[ $arg =~ $OPTION_PREFIX ]]; then prefix=${BASH_REMATCH[0]}; arg=${arg#"$prefix"}; fi
    if [[ $arg =~ $SAFE_WORD ]]; then out+=("$prefix$arg")
    elif ((DRY_RUN)) && placeholder_word "$arg"; then out+=("$prefix\"$arg\"")
    else out+=("$prefix'${arg//\'/$sq}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Does the word hold `${NAME}` placeholders and nothing else that double quotes would expand?
placeholder_word() {
  local rest=$1 found=0
  while [[ $rest =~ $PLACEHOLDER ]]; do rest=${rest/"${BASH_REMATCH[0]}"/}; found=1; done
  ((found)) && [[ $rest != *[\$\`\\\"!]* ]]
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
readonly WORKER=dtma_command_worker WORKER_FUNCTION=dtma-command-worker
readonly APIS=(cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com cloudscheduler.googleapis.com cloudtasks.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com)
# The queue's retry and rate settings. Per-toolbox concurrency is bounded by the worker itself
# (TOOLBOX_MAX_CONCURRENT_COMMANDS: commands beyond it wait); the queue bounds the whole fleet.
readonly QUEUE_MAX_CONCURRENT=50
readonly QUEUE_SETTINGS=(
  # A delivery that fails (worker cold start or redeploy, database or agent briefly unreachable, a
  # toolbox at its limit) is retried: 20 attempts with backoffs 1, 2, 4, 8, 16, 32 s, then 60 s
  # (--max-backoff), about 15 minutes in all, past the sweep's deadlines for a command.
  --max-attempts=20 --min-backoff=1s --max-backoff=60s --max-doublings=5
  # At most 20 deliveries start per second, fleet-wide: a burst (a user's bulk action, the sweep
  # re-enqueueing a backlog) reaches the database and the agents at a steady pace.
  --max-dispatches-per-second=20
  # At most 50 commands run at once, fleet-wide: each holds a worker request (and at times a
  # database connection) for as long as its agent takes, up to --worker-timeout.
  --max-concurrent-dispatches="$QUEUE_MAX_CONCURRENT"
)
SA_EMAIL='^[a-z0-9][a-z0-9._-]*@[a-z0-9-]+(\.[a-z0-9-]+)+$'

cmd_gcp() {
  local project=${GCP_PROJECT:-${GOOGLE_CLOUD_PROJECT:-}} region=${GCP_REGION:-us-central1}
  local min_instances=0 max_instances=20 concurrency=40 cpu=1 timeout=60s status_concurrency=250
  # 256Mi: docs/benchmarks.md measures each function's peak RSS (target < 160 MiB) under load;
  # keep the headroom when changing this figure.
  local memory=256Mi
  local runtime_sa="" scheduler_sa="" schedule='* * * * *' env_file="" skip_apis=0
  # The worker's timeout covers the slowest command (an image pull can take many minutes); 1800 s is
  # also the longest a Cloud Tasks HTTP delivery may wait (dispatch deadline), the function limit 3600 s.
  local worker_timeout=1800s queue=mcp-dtma-commands tasks_sa=""
  local -a plan_args=() problems=()

  while (($#)); do
    local opt=$1 val=""
    case $opt in
      --dry-run | --no-default-secrets | --skip-enable-apis | --no-log-metrics | -h | --help) shift ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) (($# >= 2)) || usage_error "$opt needs a value"; val=$2; shift 2 ;;
      *) usage_error "gcp: unexpected argument '$opt'" ;;
    esac
    case $opt in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --no-default-secrets) plan_args+=(--no-default-secrets) ;;
      --skip-enable-apis) skip_apis=1 ;;
      --no-log-metrics) plan_args+=(--no-log-metrics) ;;
      --project) project=$val ;;
      --region) region=$val ;;
      --min-instances) min_instances=$val ;;
      --max-instances) max_instances=$val ;;
      --concurrency) concurrency=$val ;;
      --status-concurrency) status_concurrency=$val ;;
      --memory) memory=$val ;;
      --cpu) cpu=$val ;;
      --timeout) timeout=$val ;;
      --worker-timeout) worker_timeout=$val ;;
      --queue) queue=$val ;;
      --tasks-sa) tasks_sa=$val ;;
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
  local naming_problems=${#problems[@]}   # 0: the queue's full name can be formed (below)
  [[ $min_instances =~ ^[0-9]+$ ]] || problems+=("--min-instances: '$min_instances' is not a number")
  [[ $max_instances =~ ^[1-9][0-9]*$ ]] || problems+=("--max-instances: '$max_instances' is not a number >= 1")
  if [[ $min_instances =~ ^[0-9]+$ && $max_instances =~ ^[0-9]+$ ]] && ((min_instances > max_instances)); then
    problems+=("--min-instances $min_instances exceeds --max-instances $max_instances")
  fi
  if ! [[ $concurrency =~ ^[1-9][0-9]*$ ]] || ((concurrency > 1000)); then
    problems+=("--concurrency: '$concurrency' is not in 1..1000")
  fi
  if ! [[ $status_concurrency =~ ^[1-9][0-9]*$ ]] || ((status_concurrency > 1000)); then
    problems+=("--status-concurrency: '$status_concurrency' is not in 1..1000")
  fi
  [[ $cpu =~ ^[0-9]+(\.[0-9]+)?$ ]] || problems+=("--cpu: '$cpu' is not a number of vCPUs")
  [[ $memory =~ ^[1-9][0-9]*(Mi|Gi)$ ]] || problems+=("--memory: '$memory' is not like 256Mi or 1Gi")
  if [[ $timeout =~ ^[1-9][0-9]*s?$ ]]; then timeout=${timeout%s}s
  else problems+=("--timeout: '$timeout' is not a number of seconds")
  fi
  if [[ $worker_timeout =~ ^[1-9][0-9]*s?$ ]] && ((${worker_timeout%s} <= 3600)); then
    worker_timeout=${worker_timeout%s}s
  else problems+=("--worker-timeout: '$worker_timeout' is not a number of seconds up to 3600")
  fi
  [[ -n ${schedule// /} ]] || problems+=("--schedule: empty")
  # Cloud Tasks queue ids: letters, digits and hyphens, at most 100.
  [[ $queue =~ ^[A-Za-z0-9-]{1,100}$ ]] || problems+=("--queue: '$queue' is not a queue name (letters, digits, -)")
  if [[ -n $project ]]; then
    # The accounts of project P are NAME@P.iam.gserviceaccount.com (domain:P: NAME@P.domain.iam...).
    local sa_domain=$project
    [[ $project == *:* ]] && sa_domain=${project#*:}.${project%%:*}
    runtime_sa=${runtime_sa:-mcp-functions@$sa_domain.iam.gserviceaccount.com}
    scheduler_sa=${scheduler_sa:-mcp-sweep-invoker@$sa_domain.iam.gserviceaccount.com}
    tasks_sa=${tasks_sa:-mcp-tasks-invoker@$sa_domain.iam.gserviceaccount.com}
  fi
  local option email
  for option in runtime-sa scheduler-sa tasks-sa; do
    email=${option//-/_}
    email=${!email}
    if [[ -n $email && ! $email =~ $SA_EMAIL ]]; then
      problems+=("--$option: '$email' is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)")
    fi
  done

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
  # What the functions that enqueue commands are told (each goes to the functions whose `used_by`
  # names it); the worker's URL is known once it is deployed, a `${DTMA_COMMAND_WORKER_URL}` until then.
  # Left out when the project, region, queue or account is already refused (no second message).
  local queue_path=projects/$project/locations/$region/queues/$queue
  if ((naming_problems == 0)) && [[ $queue =~ ^[A-Za-z0-9-]{1,100}$ && $tasks_sa =~ $SA_EMAIL ]]; then
    plan_args+=(--deploy-env "COMMAND_QUEUE=$queue_path" --deploy-env "COMMAND_INVOKER_SA=$tasks_sa"
      --deploy-env TASKS_MODE=cloud_tasks --deploy-env-url "COMMAND_WORKER_URL=$WORKER")
  fi
  # Who may call the sweep and the worker, which check their caller's OIDC token besides IAM: the
  # scheduler's and the queue's accounts, and each function's own URL (the audience of their tokens).
  if ((naming_problems == 0)) && [[ $scheduler_sa =~ $SA_EMAIL && $tasks_sa =~ $SA_EMAIL ]]; then
    plan_args+=(--deploy-env "SWEEP_INVOKER_SA=$scheduler_sa" --deploy-env "WORKER_INVOKER_SA=$tasks_sa"
      --deploy-env-url "SWEEP_INVOKER_AUDIENCE=$SWEEP" --deploy-env-url "WORKER_INVOKER_AUDIENCE=$WORKER")
  fi
  [[ $worker_timeout =~ ^[0-9]+s$ ]] && plan_args+=(--worker-timeout "${worker_timeout%s}")

  # The per-function plan: which settings and secrets each function gets, and whether each one
  # would start (shared/core/config.py's own check). One record a line, fields separated by US.
  local records rc=0
  records=$(cd "$ROOT" && "${package[@]}" --plan --format=shell --project "$project" "${plan_args[@]}") || rc=$?
  local -a entries=() names=() access=() envs=() secret_refs=() provided=() secrets=() url_refs=() order=()
  local -a metric_names=() metric_files=() metric_descriptions=() metric_configs=()
  local -A url_placeholders=()
  local kind a b c d e f tasks=0
  while IFS=$'\x1f' read -r kind a b c d e f; do
    case $kind in
      problem) problems+=("$a") ;;
      warning) printf 'deploy.sh: warning: %s\n' "$a" >&2 ;;
      function)
        entries+=("$a"); names+=("$b"); access+=("$c"); envs+=("$d"); secret_refs+=("$e"); provided+=("$f")
        # The worker is deployed first: the others are given its URL. (The plan puts first every function
        # whose URL some function is given; the sweep is given its own, which needs no order.)
        if [[ $a == "$WORKER" ]]; then order=("$((${#entries[@]} - 1))" "${order[@]}")
        else order+=("$((${#entries[@]} - 1))")
        fi
        # The queue is (re)configured with the worker or with a function that enqueues commands.
        if [[ $a == "$WORKER" || -n $f ]]; then tasks=1; fi ;;
      secret) secrets+=("$a") ;;
      url) url_refs+=("$a"); url_placeholders[$a]=$b ;;   # some env holds function $a's URL as $b
      # A log-based metric: name, the file gcloud reads, what it counts, the file's content (one line of JSON).
      log_metric) metric_names+=("$a"); metric_files+=("$b"); metric_descriptions+=("$c"); metric_configs+=("$d") ;;
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
  if ((tasks && max_instances * concurrency < QUEUE_MAX_CONCURRENT)); then
    printf 'deploy.sh: warning: the worker takes %s requests at once (--max-instances x --concurrency);\n%s\n' \
      "$((max_instances * concurrency))" \
      "  the queue dispatches up to $QUEUE_MAX_CONCURRENT at once: the others are refused and retried" >&2
  fi

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

  local -a apis=("${APIS[@]}")
  # Log-based metrics are Cloud Logging's; Metrics Explorer and alerting read them through Cloud Monitoring.
  ((${#metric_names[@]})) && apis+=(logging.googleapis.com monitoring.googleapis.com)
  ((skip_apis)) || run gcloud services enable "${apis[@]}" "${g[@]}"

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

  # The command queue, before any function that enqueues is deployed: Cloud Tasks delivers each
  # command to the worker with an OIDC token of the tasks account, which may invoke the worker only.
  if ((tasks)); then
    ensure_service_account "$tasks_sa" "MCP agent commands invoker (Cloud Tasks OIDC)"
    local -a queue_args=(--location="$region" "${QUEUE_SETTINGS[@]}" "${g[@]}")
    if exists gcloud tasks queues describe "$queue" --location="$region" "${g[@]}"; then
      run gcloud tasks queues update "$queue" "${queue_args[@]}"
    else
      note "if the queue already exists, the same flags go to: gcloud tasks queues update $queue ..."
      run gcloud tasks queues create "$queue" "${queue_args[@]}"
    fi
    # The functions (runtime account) create tasks in this queue only...
    run_retrying gcloud tasks queues add-iam-policy-binding "$queue" --location="$region" \
      --member="serviceAccount:$runtime_sa" --role=roles/cloudtasks.enqueuer "${g[@]}"
    # ...and may name the tasks account as the identity of a task's OIDC token (iam.serviceAccounts.actAs).
    run_retrying gcloud iam service-accounts add-iam-policy-binding "$tasks_sa" \
      --member="serviceAccount:$runtime_sa" --role=roles/iam.serviceAccountUser --condition=None "${g[@]}"
  fi

  # The log-based metrics, before the functions whose lines they count: a metric counts only the
  # entries written once it exists.
  if ((${#metric_names[@]})); then
    note "each log-based metric below that already exists is updated instead, from the same file:" \
      "gcloud logging metrics update NAME --config-from-file=FILE"
  fi
  local m
  for m in "${!metric_names[@]}"; do
    ensure_log_metric "${metric_names[m]}" "${metric_files[m]}" "${metric_descriptions[m]}" "${metric_configs[m]}"
  done

  # The worker comes first (order): a function given its URL is deployed after it, or, when the
  # worker is not deployed in this run, after reading the URL of the one deployed before. The sweep and
  # the worker are also given their own URL (the audience they check), read before they are deployed.
  local i env ref target own_url first_deploy
  local -a deploy
  local -A urls=()
  for i in "${order[@]}"; do
    env=${envs[i]} first_deploy=0
    for target in "${url_refs[@]}"; do
      ref=${url_placeholders[$target]}
      [[ $env == *"$ref"* ]] || continue
      if [[ ! -v "urls[$target]" && $target == "${entries[i]}" ]]; then
        # Its own URL, the audience its callers' OIDC tokens carry: known if it was deployed before.
        if own_url=$(deployed_url "${names[i]}" "$region" "$project"); then urls[$target]=$own_url
        else first_deploy=1; continue
        fi
      elif [[ ! -v "urls[$target]" ]]; then
        urls[$target]=$(function_url "${target//_/-}" "$region" "$project")
        if [[ $target == "$WORKER" ]]; then allow_tasks_to_invoke_worker; fi
      fi
      ((DRY_RUN)) || env=${env//"$ref"/"${urls[$target]}"}   # a dry run shows the placeholder
    done
    if ((first_deploy)); then
      # Not deployed yet, so its URL is unknown: deploy it with an audience no token carries (it refuses
      # every caller, and IAM lets none through yet), read its URL, and deploy it again with that.
      ref=${url_placeholders[${entries[i]}]}
      function_deploy_command "$i" "${env//"$ref"/"https://${names[i]}.not-deployed-yet.invalid"}"
      run "${deploy[@]}" --quiet
      urls[${entries[i]}]=$(function_url "${names[i]}" "$region" "$project")
      env=${env//"$ref"/"${urls[${entries[i]}]}"}
    fi
    function_deploy_command "$i" "$env"
    run "${deploy[@]}" --quiet
    [[ -v "urls[${entries[i]}]" ]] || urls[${entries[i]}]=$(function_url "${names[i]}" "$region" "$project")
    if [[ ${entries[i]} == "$WORKER" ]]; then allow_tasks_to_invoke_worker; fi
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

# The `gcloud functions deploy` of entry i of the plan, with environment $2, into `deploy` (cmd_gcp's).
function_deploy_command() {
  local i=$1
  deploy=(gcloud functions deploy "${names[i]}" --gen2 --region="$region" --project="$project"
    --runtime=python312 --source="build/gcp/${entries[i]}" --entry-point="${entries[i]}" --trigger-http
    --service-account="$runtime_sa")
  # User-facing functions verify the Supabase JWT in code and the heartbeat its toolbox token:
  # browsers cannot mint Google ID tokens and CORS preflights carry no credentials, so Cloud Run
  # IAM must let them through. The scheduler-driven sweep and the queue-driven worker are IAM-private.
  if [[ ${access[i]} == public ]]; then deploy+=(--allow-unauthenticated)
  else deploy+=(--no-allow-unauthenticated)
  fi
  # mcp_status serves watch streams (docs/watch.md), each holding a request and a gunicorn thread for up to
  # WATCH_MAX_SECONDS: as many threads as requests (functions-framework's default is 4 per vCPU).
  local env=$2
  if [[ ${entries[i]} == mcp_status ]]; then
    if [[ $env == '^'?'^'* ]]; then env+="${env:1:1}THREADS=$status_concurrency"
    elif [[ -n $env ]]; then env+=",THREADS=$status_concurrency"
    else env="THREADS=$status_concurrency"
    fi
  fi
  deploy+=(--set-env-vars="$env")
  if [[ -n ${secret_refs[i]} ]]; then deploy+=(--set-secrets="${secret_refs[i]}")
  else deploy+=(--clear-secrets)
  fi
  # The worker holds one agent call per request for minutes: it takes no more requests at once
  # than functions-framework's gunicorn has threads (4 per vCPU, at least 1 vCPU), or a quick
  # command would wait behind slow pulls for a free thread. More commands, more instances.
  local taken=$concurrency
  if [[ ${entries[i]} == "$WORKER" ]]; then taken=$((4 * ${cpu%%.*} > 4 ? 4 * ${cpu%%.*} : 4)); fi
  if [[ ${entries[i]} == mcp_status ]]; then taken=$status_concurrency; fi
  deploy+=(--min-instances="$min_instances" --max-instances="$max_instances" --concurrency="$taken"
    --cpu="$cpu" --memory="$memory")
  if [[ ${entries[i]} == "$WORKER" ]]; then deploy+=(--timeout="$worker_timeout")
  else deploy+=(--timeout="$timeout")
  fi
}

# Create a log-based metric from its LogMetric file, or update it when it exists (re-running converges).
# A dry run prints the file's content instead of writing it.
ensure_log_metric() {
  local name=$1 file=$2 description=$3 config=$4
  note "log-based metric $name: $description"
  note "$file: $config"
  if ((!DRY_RUN)); then
    mkdir -p -- "$(dirname -- "$file")"
    printf '%s\n' "$config" >"$file"
  fi
  if exists gcloud logging metrics describe "$name" --format='value(name)' "${g[@]}"; then
    run gcloud logging metrics update "$name" --config-from-file="$file" "${g[@]}"
  else
    run gcloud logging metrics create "$name" --config-from-file="$file" "${g[@]}"
  fi
}

# Cloud Run Invoker on the worker only, for the tasks account: the tasks' OIDC token opens nothing else.
allow_tasks_to_invoke_worker() {
  ((tasks)) || return 0
  run_retrying gcloud functions add-invoker-policy-binding "$WORKER_FUNCTION" --region="$region" \
    --member="serviceAccount:$tasks_sa" "${g[@]}"
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
  url=$("${cmd[@]}") || die "could not read the URL of $name: is it deployed? (deploy.sh gcp --only $name)"
  # Checked strictly: the URL goes into other functions' --set-env-vars.
  [[ $url =~ ^https://[A-Za-z0-9.-]+(/[A-Za-z0-9._/-]*)?$ ]] || die "could not read the URL of $name (got '$url')"
  printf '%s' "$url"
}

# The URL of a function deployed before, or status 1 when it is not (yet) deployed. A dry run prints
# the command that reads it and answers with the placeholder, as function_url does.
deployed_url() {
  local name=$1 region=$2 project=$3 url
  local -a cmd=(gcloud functions describe "$name" --gen2 --region="$region" --project="$project"
    --format='value(serviceConfig.uri)')
  if ((DRY_RUN)); then
    function_url "$@"
    note "if $name is not deployed yet (the describe above fails), it is deployed twice: first with" \
      "https://$name.not-deployed-yet.invalid for its URL (so it refuses every caller), then, its URL read" \
      "with the same describe, as below"
    return 0
  fi
  show "${cmd[@]}"
  url=$("${cmd[@]}" 2>/dev/null) || return 1
  [[ $url =~ ^https://[A-Za-z0-9.-]+(/[A-Za-z0-9._/-]*)?$ ]] || die "could not read the URL of $name (got '$url')"
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
    if ((tasks)); then
      local worker="$WORKER_FUNCTION ${urls[$WORKER]:-(URL not read in this run)}"
      if [[ " ${entries[*]} " == *" $WORKER "* ]]; then worker+=" (timeout $worker_timeout)"; fi
      printf '%sCloud Tasks queue %s delivers agent commands to %s, with an OIDC token of %s.\n' \
        "$prefix" "$queue_path" "$worker" "$tasks_sa"
    fi
    if ((${#metric_names[@]})); then
      local metrics
      printf -v metrics '%s, ' "${metric_names[@]}"
      printf '%sLog-based metrics (in Metrics Explorer as logging/user/NAME): %s.\n' "$prefix" "${metrics%, }"
    fi
    # The web app reaches the user-facing functions (public, but not the agents' heartbeat) through one
    # FunctionsClient whose base URL is the project's cloudfunctions.net address (docs/web-app.md).
    local -a web=()
    for i in "${!entries[@]}"; do
      if [[ ${access[i]} == public && ${entries[i]} != dtma_heartbeat_ingest ]]; then web+=("${names[i]}"); fi
    done
    if ((${#web[@]})); then
      local called
      printf -v called '%s, ' "${web[@]}"
      printf '%sWeb app (docs/web-app.md): new FunctionsClient('"'"'https://%s-%s.cloudfunctions.net'"'"') invokes %s.\n' \
        "$prefix" "$region" "$project" "${called%, }"
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
