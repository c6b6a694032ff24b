"""diffquant's benchmark: ``python -m bench [--quick | --smoke]``; see bench/README.md."""
