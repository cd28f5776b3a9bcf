"""Face detection, recognition and the checks on enrolment photos."""
