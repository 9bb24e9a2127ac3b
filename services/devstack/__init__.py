"""A local stack for development and tests, without Docker: `python -m services.devstack`.

infra.py runs Kafka and PostgreSQL as background processes under EARN_DATA_DIR (default .data/),
processes.py launches and supervises the platform's own processes; __main__.py is the CLI that
`make run`, `make test` and `make bench` call.
"""
