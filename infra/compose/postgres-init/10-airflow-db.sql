-- Runs once, when the Postgres volume is first initialised: Airflow's metadata lives beside Tandem's data.
CREATE DATABASE airflow OWNER tandem;
\connect tandem
CREATE EXTENSION IF NOT EXISTS vector;
