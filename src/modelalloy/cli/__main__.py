"""`python -m modelalloy.cli`: the `alloy` command."""

from modelalloy.cli import main

main()
