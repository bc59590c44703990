"""The absl entry points: `python -m experiments.<name>`."""

from experiments import tcmalloc

tcmalloc.use_tcmalloc()  # first: the restart it may do costs nothing imported yet
