#!/usr/bin/env bash
# Old name, kept as an alias: the two first-run commands became one, benchmarks/gpu_visit.sh.
exec bash "$(dirname "$0")/gpu_visit.sh" "$@"
