//! The ClickHouse table: one layout for current servers and one for servers older
//! than 20 (such as the 18.16 that Debian ships), and the DDL that creates each.
//!
//! Duplicates: the table is a `ReplacingMergeTree` ordered by `(source_name,
//! message_id)`, so rows of the same event collapse on merge (`FINAL` shows them
//! collapsed at once). On modern servers each INSERT also carries an
//! `insert_deduplication_token` (with `non_replicated_deduplication_window`), so an
//! INSERT retried with the same events is dropped whole by the server.

/// Which table layout the server gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// ClickHouse 20 and later: millisecond `DateTime64`, `LowCardinality`, ZSTD.
    Modern,
    /// Before 20: second-precision `DateTime`, plain `String` (milliseconds stay in
    /// `payload`).
    Legacy,
}

impl Layout {
    /// The layout for a server version string such as `18.16.1` or `24.8.4.13`.
    pub fn for_server_version(version: &str) -> Layout {
        let major: u32 = version
            .trim()
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major >= 20 {
            Layout::Modern
        } else {
            Layout::Legacy
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Modern => "modern",
            Layout::Legacy => "legacy",
        }
    }
}

/// Column names in RowBinary order.
pub const COLUMN_NAMES: &str =
    "message_id, source_name, type, event, user_id, anonymous_id, timestamp, received_at, payload";

/// Column definitions, in RowBinary order (also the structure string to decode a
/// RowBinary file with `file(…, RowBinary, structure)`).
pub fn columns(layout: Layout) -> &'static str {
    match layout {
        Layout::Modern => {
            "message_id String, source_name LowCardinality(String), type LowCardinality(String), \
             event LowCardinality(String), user_id String, anonymous_id String, \
             timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'), payload String"
        }
        Layout::Legacy => {
            "message_id String, source_name String, type String, event String, user_id String, \
             anonymous_id String, timestamp DateTime, received_at DateTime, payload String"
        }
    }
}

pub fn create_database(database: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS `{database}`")
}

pub fn create_table(layout: Layout, database: &str, table: &str) -> String {
    let columns = match layout {
        // The payload column gets stronger compression: it is most of the bytes.
        Layout::Modern => columns(layout).replace("payload String", "payload String CODEC(ZSTD(3))"),
        Layout::Legacy => columns(layout).to_string(),
    };
    let settings = match layout {
        Layout::Modern => "\nSETTINGS non_replicated_deduplication_window = 1000",
        Layout::Legacy => "",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS `{database}`.`{table}` ({columns})\n\
         ENGINE = ReplacingMergeTree()\n\
         PARTITION BY toYYYYMM(received_at)\n\
         ORDER BY (source_name, message_id){settings}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_server_major_version() {
        assert_eq!(Layout::for_server_version("18.16.1"), Layout::Legacy);
        assert_eq!(Layout::for_server_version("19.17.6.36"), Layout::Legacy);
        assert_eq!(Layout::for_server_version("20.3.1"), Layout::Modern);
        assert_eq!(Layout::for_server_version("26.1.2.3\n"), Layout::Modern);
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// docs/backends.md shows the DDL an operator can run by hand; it must be the
    /// DDL breakwater runs.
    #[test]
    fn the_documented_ddl_is_the_ddl_in_use() {
        let docs = include_str!("../../../docs/backends.md");
        for layout in [Layout::Modern, Layout::Legacy] {
            let ddl = create_table(layout, "breakwater", "events");
            assert!(
                docs.contains(&ddl),
                "docs/backends.md lacks the {} DDL:\n{ddl}",
                layout.name()
            );
        }
    }
}
