"""The offline side: training, metallurgical accounting and reports, scoring a run against
what was on the belt."""
