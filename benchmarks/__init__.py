"""What `make bench` runs: each result is one `name: value` line, ratios measured side by side in one run."""
