"""Analysis of recorded latents (never JAX): `metrics` (geometry on arrays: drift, CKA / RSA,
attention share), `probes` (cross-validated probes with their uncertainty), `api` (the seed's names
on task files, read lazily), `cohort` (per-episode features across tasks), `report` (the HTML
report of `latentpi analyze`). Definitions: docs/analysis.md."""
