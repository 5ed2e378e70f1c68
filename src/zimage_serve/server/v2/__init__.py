"""Comfy API v2 (`/api/v2/...`), served natively over the same queue, users and files as ComfyUI's API: a
v2 job is an ordinary job (it shows in /queue, /history and /api/jobs), submitted through the one
submission path (`SubmissionBatcher`), and ComfyUI-API jobs can be read through v2.

- `envelope`: v2's error envelope, `{"error": {code, message, details}}`, for every answer under /api/v2;
- `job_view`: a stored job as v2's `Job` (status, progress, outputs as assets, error, links);
- `feeds`: what event streams follow: each job's latest progress, preview and outputs, from its events;
- `jobs`: the job routes (submit with an idempotency key, list, get, workflow, cancel, events);
- `assets`: the asset routes (upload, from-hash, by-hash, get, content with Range, delete) and the
  resolution of `core/ASSET` references in a submitted workflow.
"""
