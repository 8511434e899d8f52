"""Object-storage tests: a real S3-compatible server (moto) on 127.0.0.1, started by the fixtures in conftest.py;
the whole tier is skipped when the `remote` and `test` extras (obstore, moto[server], boto3) are not installed."""
