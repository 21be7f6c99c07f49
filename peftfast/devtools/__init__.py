"""Developer tooling, apart from what users import: ``peftfast bench`` (runs the suites in bench/),
``peftfast tune`` (times kernel configs on a GPU and writes kernels/configs/<gpu>.json) and the coverage
matrix (model families x methods, rendered into the README and checked against PEFT by the tests).
"""
