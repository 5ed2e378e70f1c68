#!/bin/sh
# Product images from a catalogue: one image per row of products.csv, named after
# the SKU and seed, in a folder per category. Run it again after a stop and it resumes where it was.
#
#   sh run.sh                                     # here, with Z-Image-Turbo's files in your models folder
#   SERVER=http://gpu-box:8188 ZIMAGE_TOKEN=zis_... sh run.sh    # on a server (ours or any ComfyUI)
#   TEMPLATE=zimage-nano sh run.sh                # a try-out with the built-in model, no download
#   SERVER=... WEBHOOK=catalogue sh run.sh        # each job's events also go to the endpoint named catalogue
set -e
here=$(dirname "$0")
zimage batch "$here/products.csv" \
  --template "${TEMPLATE:-z-image-turbo}" \
  --set "prompt=E-commerce product photo of {title}, {style}, studio lighting, clean background" \
  --set seed=42 \
  --name "{category}/{sku}_{seed}" \
  --out "${OUT:-$here/images}" \
  ${SERVER:+--server "$SERVER" --concurrency 2} \
  ${WEBHOOK:+--webhook "$WEBHOOK"}
