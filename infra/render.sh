#!/usr/bin/env bash
# Fill the placeholders of the infra templates (upper-case names between
# double underscores, e.g. __STUDY_BUCKET__) from MIM_* environment variables
# and write the results under infra/rendered/ (git-ignored), leaving the
# templates untouched.
#
#   bash infra/render.sh aws   # cluster-hardened.yaml, iam/*.json (EC2), aws/sg-ingress.json
#   bash infra/render.sh k8s   # kuberay/raycluster.yaml, iam/ (IRSA + bucket)
#
# Every placeholder used by the selected templates must have its variable set
# (e.g. __STUDY_BUCKET__ <- MIM_STUDY_BUCKET); values are checked against a
# strict pattern so that nothing but ids and names can end up in the files.
# Defaults: MIM_AWS_REGION=us-east-1, MIM_STUDY_PREFIX=mim, MIM_KEY_NAME=mim-ray,
# MIM_K8S_NAMESPACE=mim. Output directory: MIM_RENDER_DIR (default
# infra/rendered). No secret is ever needed here.
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${MIM_RENDER_DIR:-$INFRA_DIR/rendered}"
TARGET="${1:-aws}"

: "${MIM_AWS_REGION:=us-east-1}"
: "${MIM_STUDY_PREFIX:=mim}"
: "${MIM_KEY_NAME:=mim-ray}"
: "${MIM_K8S_NAMESPACE:=mim}"

case "$TARGET" in
  aws) TEMPLATES=(cluster-hardened.yaml iam/study-bucket-access.json iam/worker-no-infra-writes.json iam/head-autoscaler.json
                  iam/ec2-trust-policy.json iam/bucket-policy.json aws/sg-ingress.json) ;;
  k8s) TEMPLATES=(kuberay/raycluster.yaml iam/study-bucket-access.json
                  iam/irsa-trust-policy.json iam/bucket-policy.json) ;;
  *) echo "usage: $0 [aws|k8s]" >&2; exit 2 ;;
esac

pattern_for() {
  case "$1" in
    AWS_REGION)        echo '^[a-z]{2}(-[a-z]+)+-[0-9]$' ;;
    AWS_ACCOUNT_ID)    echo '^[0-9]{12}$' ;;
    STUDY_BUCKET)      echo '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' ;;
    STUDY_PREFIX)      echo '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$' ;;
    MIM_RELEASE)       echo '^[A-Za-z0-9._-]+$' ;;
    AMI_ID)            echo '^ami-[0-9a-f]{8,17}$' ;;
    KEY_NAME)          echo '^[A-Za-z0-9._-]+$' ;;
    SECURITY_GROUP_ID) echo '^sg-[0-9a-f]{8,17}$' ;;
    OPERATOR_CIDR)     echo '^([0-9]{1,3}\.){3}[0-9]{1,3}/(2[4-9]|3[0-2])$' ;;
    IMAGE)             echo '^[A-Za-z0-9][A-Za-z0-9./:@_-]*$' ;;
    EKS_OIDC_PROVIDER) echo '^oidc\.eks\.[a-z0-9-]+\.amazonaws\.com/id/[A-Za-z0-9]+$' ;;
    K8S_NAMESPACE)     echo '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' ;;
    *) return 1 ;;
  esac
}

# MIM_RELEASE is already prefixed; every other placeholder NAME reads MIM_NAME.
var_for() { if [[ "$1" == MIM_* ]]; then echo "$1"; else echo "MIM_$1"; fi; }

names=$(cd "$INFRA_DIR" && grep -oh '__[A-Z0-9_]*__' "${TEMPLATES[@]}" | sort -u | sed 's/^__//; s/__$//')
sed_args=()
errors=0
for name in $names; do
  var="$(var_for "$name")"
  if ! re="$(pattern_for "$name")"; then
    echo "render.sh: no pattern for placeholder __${name}__" >&2; errors=1; continue
  fi
  val="${!var:-}"
  if [[ -z "$val" ]]; then
    echo "render.sh: $var is not set (needed for __${name}__)" >&2; errors=1; continue
  fi
  if ! [[ "$val" =~ $re ]]; then
    echo "render.sh: $var='$val' does not match $re" >&2; errors=1; continue
  fi
  if [[ "$name" == OPERATOR_CIDR && "$val" == 0.0.0.0/* ]]; then
    echo "render.sh: MIM_OPERATOR_CIDR must be your own address, not 0.0.0.0" >&2; errors=1; continue
  fi
  sed_args+=(-e "s|__${name}__|${val}|g")
done
[[ $errors -eq 0 ]] || exit 1

for t in "${TEMPLATES[@]}"; do
  mkdir -p "$OUT_DIR/$(dirname "$t")"
  sed "${sed_args[@]}" "$INFRA_DIR/$t" > "$OUT_DIR/$t"
  if grep -n '__[A-Z0-9_]*__' "$OUT_DIR/$t" >&2; then
    echo "render.sh: unfilled placeholder left in $OUT_DIR/$t" >&2; exit 1
  fi
  echo "rendered $OUT_DIR/$t"
done
