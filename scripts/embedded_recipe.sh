#!/usr/bin/env bash
# The brief-tool recipe of the shipped embedded policy (docs/training_log.md), phase by phase. Each phase is
# skipped when its output is there; a killed phase continues from its newest checkpoint when the script runs again.
# About 80 minutes on 2 CPU cores for the SFT phases (detect SFT, brief SFT, copy probe, copy SFT, mixed SFT: the
# shipped embedded-sft), then ~30 minutes of GRPO from it (configs/grpo_embedded_brief_budget.yaml, measured not
# better, so not shipped).
#
#   bash scripts/embedded_recipe.sh        # SFT phases (-> runs/sft_embedded_mixed_brief), then GRPO
#   bash scripts/embedded_recipe.sh sft    # SFT phases only
#   bash scripts/embedded_recipe.sh roots  # only the two starting checkpoints below
#
# It starts from the shipped policies (the oracle-era recipe continued on
# predicted-mode conversations), taken from the repository's history into runs/embedded-sft-v1 and
# runs/embedded-v1 (the no-tools baseline, configs/sft_notools_predicted.yaml, starts from the latter).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# the shipped pair's folders as git trees (content hashes: the same in every clone, whatever the commits' ids)
declare -A ROOT_TREE=(
    [embedded-sft]=1f8c6de4c00c188ec2076104ed40a2ed514b77d0
    [embedded]=06f0075b288df79ee6293f018771ddd9d7a33d80
)

for name in embedded-sft embedded; do
    if [ ! -f "runs/$name-v1/medgym.json" ]; then
        mkdir -p "runs/$name-v1"
        git archive "${ROOT_TREE[$name]}" | tar -x -C "runs/$name-v1"
    fi
done
[ "${1:-all}" = roots ] && exit 0

resume_flag() { if compgen -G "$1/checkpoint-*" >/dev/null; then echo --resume; fi; }

sft() {  # sft CONFIG OUTPUT_DIR [overrides]
    local config=$1 out=$2; shift 2
    if [ -f "$out/final/medgym.json" ]; then echo "== $out: done"; return; fi
    echo "== $config -> $out"
    medgym train sft --config "$config" $(resume_flag "$out") "$@"
}

sft configs/sft_embedded_detect.yaml runs/sft_embedded_detect
sft configs/sft_embedded_brief.yaml runs/sft_embedded_brief --max_steps 200
if [ ! -f runs/copy_probe_brief/medgym.json ]; then
    echo "== copy probe -> runs/copy_probe_brief"
    python scripts/copy_probe.py runs/sft_embedded_brief/final --system --steps 600 --batch 32 --out runs/copy_probe_brief
fi
sft configs/sft_embedded_copy_brief.yaml runs/sft_embedded_copy_brief
sft configs/sft_embedded_mixed_brief.yaml runs/sft_embedded_mixed_brief   # the SFT to compare GRPO against
[ "${1:-all}" = sft ] && exit 0

out=runs/grpo_embedded_brief_budget
if [ -f "$out/final/medgym.json" ]; then echo "== $out: done"; exit 0; fi
echo "== configs/grpo_embedded_brief_budget.yaml -> $out"
medgym train grpo --config configs/grpo_embedded_brief_budget.yaml $(resume_flag "$out")
