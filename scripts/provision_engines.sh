#!/usr/bin/env bash
# The engines and object-store stand-ins that tests/engines/ runs against, built or fetched once
# and kept outside the checkout (CI runs in a fresh clone each time):
#   prism            go install ...go/cmd/prism@v<Beam version of .venv>  -> $ENGINES_CACHE/prism-v<version>/prism
#   fake-gcs-server  go install github.com/fsouza/fake-gcs-server@v1.56.1 -> $ENGINES_CACHE/fake-gcs-server-v1.56.1/
#   flink, spark     Beam's job server jars, from Maven Central into ~/.m2 (mvn dependency:get)
# Go's module and build caches stay where Go keeps them (go env GOMODCACHE GOCACHE), the jars in
# Maven's local repository. Idempotent: a tool already there is not built again.
#
#   scripts/provision_engines.sh PYTHON [TOOL...]   (default tools: prism fake-gcs-server)
# Prints what it did for each tool and how long it took; exits non-zero if a tool could not be had.
# Each build or download is stopped after ENGINES_FETCH_TIMEOUT_SECS (default 1200): a proxy that
# answers slowly or never must not hold ./dev test (nor the runs waiting on its lock) for ever.
set -euo pipefail

python=${1:?usage: provision_engines.sh PYTHON [TOOL...]}
shift
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(prism fake-gcs-server)

cache=${BEAM_TINYBIRD_ENGINES_CACHE:-$HOME/.cache/beam-tinybird-engines}
fetch_secs=${ENGINES_FETCH_TIMEOUT_SECS:-1200}
beam_version=$("$python" -c 'import apache_beam; print(apache_beam.__version__)')
fake_gcs_version=v1.56.1
mkdir -p "$cache"

go_tool() {  # go_tool NAME MODULE@VERSION DIR
  local name=$1 module=$2 dir=$3 started=$SECONDS
  if [ -x "$dir/$name" ]; then
    echo "engines: $name: cached at $dir/$name"
    return 0
  fi
  command -v go >/dev/null 2>&1 || { echo "engines: $name: Go is not installed (needed to build $module)" >&2; return 1; }
  # Built into a temporary folder and moved: a run stopped half-way leaves no half-written binary.
  rm -rf "$dir.tmp"
  local rc=0
  GOBIN="$dir.tmp" GOFLAGS=-mod=mod timeout --kill-after=10 "$fetch_secs" go install "$module" || rc=$?
  if [ $rc -ne 0 ]; then
    rm -rf "$dir.tmp"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "engines: $name: go install $module did not finish in $fetch_secs s (ENGINES_FETCH_TIMEOUT_SECS); stopped" >&2
    else
      echo "engines: $name: go install $module failed (exit $rc)" >&2
    fi
    return 1
  fi
  mv "$dir.tmp" "$dir"
  echo "engines: $name: built $module in $((SECONDS - started)) s -> $dir/$name"
}

maven_jar() {  # maven_jar ARTIFACT_ID: org.apache.beam:ARTIFACT_ID:<Beam version> into ~/.m2
  local artifact=$1 started=$SECONDS
  local jar="$HOME/.m2/repository/org/apache/beam/$artifact/$beam_version/$artifact-$beam_version.jar"
  if [ -f "$jar" ]; then
    echo "engines: $artifact: cached at $jar"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || { echo "engines: $artifact: Maven (mvn) is not installed" >&2; return 1; }
  local rc=0
  timeout --kill-after=10 "$fetch_secs" mvn -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:get \
      -Dartifact="org.apache.beam:$artifact:$beam_version" -Dtransitive=false >"$cache/mvn-$artifact.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    local why="did not serve"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && why="did not finish in $fetch_secs s (ENGINES_FETCH_TIMEOUT_SECS) with"
    echo "engines: $artifact: Maven Central $why org.apache.beam:$artifact:$beam_version" \
         "(log: $cache/mvn-$artifact.log)" >&2
    return 1
  fi
  echo "engines: $artifact: downloaded in $((SECONDS - started)) s -> $jar"
}

status=0
for tool in "${tools[@]}"; do
  case "$tool" in
    prism) go_tool prism "github.com/apache/beam/sdks/v2/go/cmd/prism@v$beam_version" \
                 "$cache/prism-v$beam_version" || status=1 ;;
    fake-gcs-server) go_tool fake-gcs-server "github.com/fsouza/fake-gcs-server@$fake_gcs_version" \
                 "$cache/fake-gcs-server-$fake_gcs_version" || status=1 ;;
    # Beam 2.77 submits to the newest Flink it knows by default (--flink_version).
    flink) maven_jar beam-runners-flink-2.2-job-server || status=1 ;;
    spark) maven_jar beam-runners-spark-3-job-server || status=1 ;;
    *) echo "engines: unknown tool '$tool' (prism, fake-gcs-server, flink, spark)" >&2; status=2 ;;
  esac
done
exit $status
