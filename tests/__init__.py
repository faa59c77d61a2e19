"""kubetune's tests: one folder per layer, with the helpers they share in `tests.support`."""
