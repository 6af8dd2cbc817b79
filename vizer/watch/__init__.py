"""Watching a run while it trains: where a step's time goes, the canary pictures, and the monitor's warnings
and `monitor.stop_on`. They read what training computes and never change it: a watched run trains the same."""
