# Makes conf/ the package `gpudl.conf` (see pyproject.toml): the YAML files ship inside the
# installed package, and Hydra finds them at pkg://gpudl.conf.
