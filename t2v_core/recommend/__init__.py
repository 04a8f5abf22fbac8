"""Expert recommendation: MODEL2VEC, the selectors and transferability scores, the
meta-dataset they learn from, and the Table-1 protocol. Imports only the packages below."""
