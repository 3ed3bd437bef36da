"""AWS Batch entry points of the topx pipeline: `python -m batch_jobs.train.main`, `... .search.main`."""
