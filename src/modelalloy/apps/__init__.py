"""Applications on top of the library: the demos (`alloy demo`, `alloy demo-search`) on real
models and corpora that packages ship. Nothing in the library imports this package."""
