"""Errors and warnings about a delivery, shaped for the report (never holding names, emails or passwords)."""

from dataclasses import asdict, dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Issue:
    """One problem found in a delivery: where it is and what was expected.

    `line` is the 1-based line in the CSV file (the header is line 1); 0 when the issue is about a
    whole file. `sourced_id` names the record, never its personal data.
    """

    severity: str
    file: str
    line: int
    column: str
    sourced_id: str
    message: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def one_line(self) -> str:
        where = self.file
        if self.line:
            where += f" line {self.line}"
        if self.column:
            where += f" column {self.column}"
        who = f" [{self.sourced_id}]" if self.sourced_id else ""
        return f"{self.severity.upper()} {where}{who}: {self.message}"


def file_error(file: str, message: str, column: str = "") -> Issue:
    return Issue(ERROR, file, 0, column, "", message)


def file_warning(file: str, message: str, column: str = "") -> Issue:
    return Issue(WARNING, file, 0, column, "", message)


class DeliveryRefusedError(Exception):
    """A file-level problem: the whole delivery is refused and nothing is applied."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("; ".join(i.one_line() for i in issues if i.severity == ERROR))
