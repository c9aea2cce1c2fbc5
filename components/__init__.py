"""Tandem's pipeline components: plain typed functions, no Airflow import at module level."""
