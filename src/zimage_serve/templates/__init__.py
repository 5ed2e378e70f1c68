"""Templates: a workflow plus named parameters and a version, rendered to a graph by name, not node id."""

from zimage_serve.templates.document import Parameter, Template, TemplateError, TemplateParameterError
from zimage_serve.templates.library import TemplateLibrary, TemplateNotFound

__all__ = ["Parameter", "Template", "TemplateError", "TemplateLibrary", "TemplateNotFound", "TemplateParameterError"]
