"""The omniglot pipeline: python -m experiments.omniglot --workdir=DIR (see configs/omniglot.py)."""

from experiments import launch

if __name__ == '__main__':
  launch.run('omniglot')
