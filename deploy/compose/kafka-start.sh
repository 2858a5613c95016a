#!/usr/bin/env bash
# Entry point of the compose stack's Kafka (the official apache/kafka image, KRaft, one node).
#
# The broker is configured the image's documented way: KAFKA_* variables (docker-compose.yml) rendered into
# server.properties by the image's own kafka.docker.KafkaDockerWrapper. What those variables cannot carry
# without exposing a secret is added here, from the admin's credentials file (a compose secret):
#   - the listeners' JAAS entries (the admin logs in to itself over SCRAM and to the controller over PLAIN),
#     as the wrapper's "file input" server.properties, in a private temporary folder;
#   - the admin's SCRAM credentials, created when the storage is formatted (the broker can only authenticate
#     a first user that exists before it starts). The image's own start formats without them, so the wrapper
#     renders the configuration against a scratch log directory and the real one is formatted here, with the
#     StorageTool's arguments in a private @argfile: a password never appears on a command line.
# The other roles' users, the ACLs and the topics come from the kafka-init service (deploy/compose/provision.py).
set -euo pipefail
umask 077

# (Overridable for tests/test_compose.py, which runs this script against a stand-in for the image.)
secret=${INSPECTION_ADMIN_CREDENTIALS:-/run/secrets/admin-credentials}
kafka=${INSPECTION_KAFKA_DIR:-/opt/kafka}
value() { sed -n "s/^$1=//p" "$secret" | tail -n 1; }
[ -r "$secret" ] || { echo "kafka-start: $secret is missing: run deploy/compose/make_secrets.py" >&2; exit 1; }
user=$(value INSPECTION_KAFKA_USERNAME)
password=$(value INSPECTION_KAFKA_PASSWORD)
if [ -z "$user" ] || [ -z "$password" ]; then
  echo "kafka-start: no admin user/password in $secret" >&2
  exit 1
fi
: "${CLUSTER_ID:?set CLUSTER_ID}" "${KAFKA_LOG_DIRS:?set KAFKA_LOG_DIRS}"

# 1. File input: the JAAS entries of every SASL listener (client listeners: SCRAM; controller: PLAIN).
input=$(mktemp -d)
scram="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$user\" password=\"$password\";"
plain="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"$user\" password=\"$password\" user_$user=\"$password\";"
{
  for listener in sasl_plaintext host; do
    for mechanism in scram-sha-256 scram-sha-512; do
      echo "listener.name.$listener.$mechanism.sasl.jaas.config=$scram"
    done
  done
  echo "listener.name.controller.plain.sasl.jaas.config=$plain"
} > "$input/server.properties"

# 2. The image's wrapper: file input + KAFKA_* variables -> $kafka/config (its own format goes to scratch).
scratch=$(mktemp -d)
KAFKA_LOG_DIRS="$scratch" "$kafka"/bin/kafka-run-class.sh kafka.docker.KafkaDockerWrapper setup \
  --default-configs-dir /etc/kafka/docker --mounted-configs-dir "$input" --final-configs-dir "$kafka"/config
rm -rf "$scratch" "$input"
echo "log.dirs=$KAFKA_LOG_DIRS" >> "$kafka"/config/server.properties  # the last value of a key wins

# 3. Format the real storage once, with the admin's SCRAM credentials for both mechanisms.
fingerprint="$(dirname "$KAFKA_LOG_DIRS")/admin-scram.sha256"  # beside the log dir, on the volume
digest=$(printf 'inspection-admin-scram\0%s\0%s' "$user" "$password" | sha256sum | cut -d' ' -f1)
if [ ! -f "$KAFKA_LOG_DIRS/meta.properties" ]; then
  argfile=$(mktemp)
  {
    printf '%s\n' kafka.tools.StorageTool format --ignore-formatted --cluster-id "$CLUSTER_ID" \
      --config "$kafka"/config/server.properties
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      printf '%s\n"%s"\n' --add-scram "$mechanism=[name=$user,password=$password,iterations=8192]"
    done
  } > "$argfile"
  "$kafka"/bin/kafka-run-class.sh "@$argfile"
  rm -f "$argfile"
  echo "$digest" > "$fingerprint"
elif [ "$(cat "$fingerprint" 2>/dev/null)" != "$digest" ]; then
  echo "kafka-start: the storage in $KAFKA_LOG_DIRS was formatted with other admin credentials than" \
       "$secret: restore them, or \`docker compose down -v\` (the data is lost)" >&2
  exit 1
fi
unset password scram plain

exec "$kafka"/bin/kafka-server-start.sh "$kafka"/config/server.properties
