#!/usr/bin/env bash
# Zero-shot COCO-2014 protocol of the MicroDiT paper: 30,000 captions of the val2014 split (the first caption of each
# of the first 30,000 images by image id), one image each, FID with Inception-v3 in the FID convention against the
# 40,504 val2014 images, each centre-cropped and resized to the samples' resolution (512 px for the 512-px model).
# Runs sharded under the Composer launcher: NPROC processes (one per GPU), each generating and scoring its own
# slice of the seeds; the feature statistics are merged at the end. benchmarks/RESULTS.md states which FID
# convention the number follows (resize, crop, weights) and what must match before comparing it with a published FID.
#
#   scripts/fid_coco.sh WEIGHTS [extra micro-diffusion eval options, e.g. --model-config run.yaml]
#
# WEIGHTS: anything `micro-diffusion eval --weights` takes (an exported folder, a training checkpoint, a DiT
# state dict with its model flags). Run it with the project's environment on PATH (composer, python3).
# Needs (downloaded once, on a machine with internet; datasets.md):
#   $COCO_ROOT/val2014/*.jpg and $COCO_ROOT/annotations/captions_val2014.json
#     wget http://images.cocodataset.org/zips/val2014.zip
#     wget http://images.cocodataset.org/annotations/annotations_trainval2014.zip
#   torch-fidelity's FID Inception weights at $MICRO_DIFFUSION_INCEPTION_WEIGHTS
#     wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
# Environment: COCO_ROOT (default datadir/coco2014), NUM_SAMPLES (30000), STEPS (30), GUIDANCE (5.0), SEED (2024),
# OUT (outputs/fid_coco), NPROC (the number of visible GPUs, 1 without one).
# Writes $OUT/prompts.txt, $OUT/samples/<seed>.png with manifest.jsonl (a killed run, started again as it was,
# keeps the samples already written; other FID tools can read the folder), and $OUT/report.json.
set -euo pipefail

WEIGHTS=${1:?usage: scripts/fid_coco.sh WEIGHTS [extra eval options]}
shift
COCO_ROOT=${COCO_ROOT:-datadir/coco2014}
NUM_SAMPLES=${NUM_SAMPLES:-30000}
STEPS=${STEPS:-30}
GUIDANCE=${GUIDANCE:-5.0}
SEED=${SEED:-2024}
OUT=${OUT:-outputs/fid_coco}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
: "${MICRO_DIFFUSION_INCEPTION_WEIGHTS:?set MICRO_DIFFUSION_INCEPTION_WEIGHTS to the FID Inception weights file}"

ANNOTATIONS="$COCO_ROOT/annotations/captions_val2014.json"
[ -f "$ANNOTATIONS" ] || { echo "missing $ANNOTATIONS (see the header of $0)" >&2; exit 1; }
[ -d "$COCO_ROOT/val2014" ] || { echo "missing $COCO_ROOT/val2014 (see the header of $0)" >&2; exit 1; }
mkdir -p "$OUT"

# The first caption of each of the first NUM_SAMPLES images (sorted by image id), one per line.
python3 - "$ANNOTATIONS" "$NUM_SAMPLES" > "$OUT/prompts.txt" <<'PY'
import json, sys
annotations = json.load(open(sys.argv[1]))["annotations"]
first = {}
for item in sorted(annotations, key=lambda a: (a["image_id"], a["id"])):
    first.setdefault(item["image_id"], " ".join(item["caption"].split()))
captions = list(first.values())[: int(sys.argv[2])]
if len(captions) < int(sys.argv[2]):
    sys.exit(f"{sys.argv[1]} has captions for {len(captions)} images, fewer than NUM_SAMPLES={sys.argv[2]}")
for caption in captions:
    print(caption)
PY
REFERENCE_COUNT=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["images"]))' "$ANNOTATIONS")

composer -n "$NPROC" -m micro_diffusion.cli eval --weights "$WEIGHTS" --prompts "$OUT/prompts.txt" \
    --num-samples "$NUM_SAMPLES" --outdir "$OUT/samples" \
    --metrics fd kid --extractor inception --extractor-weights "$MICRO_DIFFUSION_INCEPTION_WEIGHTS" \
    --reference-source folder --reference-option "root=$COCO_ROOT/val2014" \
    --reference-option "manifest=$ANNOTATIONS" --reference-count "$REFERENCE_COUNT" \
    --steps "$STEPS" --guidance "$GUIDANCE" --seed "$SEED" --out "$OUT" "$@"
