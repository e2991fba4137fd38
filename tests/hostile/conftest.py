"""The fetch tests' fixtures (a synthetic MSD task, its archive, a dataset cache), shared with tests/data."""

from tests.data.test_fetch import archive, cache, task_folder  # noqa: F401 - fixtures
