"""test_conformance — jupyter_kernel_test's KernelTests against lathe.

`import jupyter_kernel_test as jkt` (not `from ... import KernelTests`): a base class imported
into this module would be collected too and run against the default python3 kernel.
The kernelspec comes from conftest (JUPYTER_PATH -> $LATHE_BUILDDIR/test-prefix).
Skipped on purpose: code_page_something (lathe sends no pager payloads).
"""
import unittest

import jupyter_kernel_test as jkt

import conftest  # noqa: F401  (installs the kernelspec and sets JUPYTER_PATH)


class LatheKernelTests(jkt.KernelTests):
    kernel_name = "lathe"
    language_name = "lathe"
    file_extension = ".lathe"

    code_hello_world = "%echo hello, world"
    code_stderr = "%echo stream=stderr hello"

    completion_samples = [
        {"text": "%he", "matches": {"%help"}},
        {"text": "%sl", "matches": {"%sleep"}},
        {"text": "%echo stream=std", "matches": {"stream=stdout", "stream=stderr"}},
    ]
    complete_code_samples = ["%echo hi", "%help", "%sleep 0", "# only a comment"]
    incomplete_code_samples = ["%echo a \\", "%%chat\nhello"]
    invalid_code_samples = ["%nonexistent", "%sleep"]

    code_generate_error = "%nonexistent"
    code_display_data = [{"code": "%help", "mime": "text/html"},
                         {"code": "%help sleep", "mime": "text/plain"}]
    code_execute_result = [{"code": "%version", "mime": "text/plain"}]
    code_history_pattern = "%vers*"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "%sleep"
    code_clear_output = "%clear"


if __name__ == "__main__":
    unittest.main()
