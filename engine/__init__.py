"""ktnas.engine: search spaces, supernet, search algorithms, training, export and the `ktnas` CLI."""
