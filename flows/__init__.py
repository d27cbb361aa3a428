"""Prefect flows: the DAG of trtforge's stages, built from the tasks in ``tasks/``."""
