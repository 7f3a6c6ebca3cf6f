"""Stock Flower app used as the benchmark anchor."""
