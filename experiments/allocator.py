"""Prints the memory allocator that the entry points run with on this host.

  python -m experiments.allocator

'tcmalloc' where the package's import restarted this command with it
(experiments/tcmalloc.py says when), 'system' otherwise; read from the process's
own memory map, so it reports what runs, not what was intended.
"""

from experiments import tcmalloc

if __name__ == "__main__":
    print(tcmalloc.in_use())
