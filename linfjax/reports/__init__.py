"""What a run or a grid shows: report.html, the grid report, figures, tables."""
