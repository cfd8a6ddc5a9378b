"""Labs: enumerable problems with a known expert reward, where the exact distance from a trained
policy to the predicted optimum is computed. `tabular` trains a categorical policy per context
(`optima` holds its data distributions, exact objective and solver; `plots` its pictures)."""
