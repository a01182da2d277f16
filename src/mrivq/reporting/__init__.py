"""What people look at: plots of a run and its self-contained report.html."""
