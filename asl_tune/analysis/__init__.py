"""The analysis wing: compute (fronts, hypervolume, summaries, pair rates, importance, as DataFrames),
then report (the plots and report.md drawn from them). Reads Parquet through asl_tune.results; no Ray."""
