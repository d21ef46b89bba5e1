//! Prints the ClickHouse DDL breakwater runs, for operators who create the table
//! themselves (`create_table = false`):
//!   cargo run --example print_clickhouse_ddl -- modern mydb mytable
use breakwater::sinks::clickhouse::schema::{create_database, create_table, Layout};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let layout = match args.first().map(String::as_str) {
        Some("legacy") => Layout::Legacy,
        _ => Layout::Modern,
    };
    let database = args.get(1).map(String::as_str).unwrap_or("breakwater");
    let table = args.get(2).map(String::as_str).unwrap_or("events");
    println!(
        "{};\n{};",
        create_database(database),
        create_table(layout, database, table)
    );
}
