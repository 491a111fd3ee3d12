#!/usr/bin/env bash
# Zero-shot COCO-2014 protocol of the MicroDiT paper: 30,000 captions of the val2014 split, one image each,
# FID against the val2014 images at 256 px with Inception-v3 in the FID convention.
#
#   scripts/fid_coco.sh WEIGHTS [extra micro-diffusion eval options]
#
# Needs (downloaded once, on a machine with internet):
#   datadir/coco2014/val2014/*.jpg and datadir/coco2014/annotations/captions_val2014.json
#     wget http://images.cocodataset.org/zips/val2014.zip
#     wget http://images.cocodataset.org/annotations/annotations_trainval2014.zip
#   the FID Inception weights (pt_inception-2015-12-05-6726825d.pth, the torch-fidelity/pytorch-fid file) at
#     $MICRO_DIFFUSION_INCEPTION_WEIGHTS
# Environment: COCO_ROOT (default datadir/coco2014), NUM_SAMPLES (30000), STEPS (30), GUIDANCE (5.0), SEED (2024),
# OUT (outputs/fid_coco). Reference images are centre-cropped and resized to the generated resolution.
set -euo pipefail

WEIGHTS=${1:?usage: scripts/fid_coco.sh WEIGHTS [extra eval options]}
shift
COCO_ROOT=${COCO_ROOT:-datadir/coco2014}
NUM_SAMPLES=${NUM_SAMPLES:-30000}
STEPS=${STEPS:-30}
GUIDANCE=${GUIDANCE:-5.0}
SEED=${SEED:-2024}
OUT=${OUT:-outputs/fid_coco}
: "${MICRO_DIFFUSION_INCEPTION_WEIGHTS:?set MICRO_DIFFUSION_INCEPTION_WEIGHTS to the FID Inception weights file}"

ANNOTATIONS="$COCO_ROOT/annotations/captions_val2014.json"
[ -f "$ANNOTATIONS" ] || { echo "missing $ANNOTATIONS (see the header of $0)" >&2; exit 1; }
mkdir -p "$OUT"

# The first caption of each of the first NUM_SAMPLES images (sorted by image id), one per line.
python3 - "$ANNOTATIONS" "$NUM_SAMPLES" > "$OUT/prompts.txt" <<'PY'
import json, sys
annotations = json.load(open(sys.argv[1]))["annotations"]
first = {}
for item in sorted(annotations, key=lambda a: (a["image_id"], a["id"])):
    first.setdefault(item["image_id"], " ".join(item["caption"].split()))
for caption in list(first.values())[: int(sys.argv[2])]:
    print(caption)
PY

micro-diffusion eval --weights "$WEIGHTS" --prompts "$OUT/prompts.txt" --num-samples "$NUM_SAMPLES" \
    --metrics fd kid --extractor inception --extractor-weights "$MICRO_DIFFUSION_INCEPTION_WEIGHTS" \
    --reference-source folder --reference-option "root=$COCO_ROOT/val2014" \
    --reference-option "manifest=$ANNOTATIONS" --reference-count 40504 \
    --steps "$STEPS" --guidance "$GUIDANCE" --seed "$SEED" --out "$OUT" "$@"
